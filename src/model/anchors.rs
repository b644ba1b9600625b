//! torchvision's `AnchorGenerator` cell anchors, computed exactly as it does in float32.

/// The cell (zero-centred) anchors of one feature level: for each aspect ratio, for each size,
/// `[-w/2, -h/2, w/2, h/2]` rounded half-to-even, in torchvision's order.
pub fn cell_anchors(sizes: &[f32], aspect_ratios: &[f32]) -> Vec<[f32; 4]> {
    let mut anchors = Vec::with_capacity(sizes.len() * aspect_ratios.len());
    for &ratio in aspect_ratios {
        let h_ratio = ratio.sqrt();
        let w_ratio = 1.0 / h_ratio;
        for &size in sizes {
            let (ws, hs) = (w_ratio * size, h_ratio * size);
            anchors.push([-ws, -hs, ws, hs].map(|v| (v / 2.0).round_ties_even()));
        }
    }
    anchors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet_level0_matches_torchvision() {
        // torchvision: AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0]
        let a = cell_anchors(&[32.0], &[0.5, 1.0, 2.0]);
        assert_eq!(a, vec![[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]);
    }
}
