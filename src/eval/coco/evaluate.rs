//! Per-image evaluation: pycocotools' `_prepare`, `computeIoU` and `evaluateImg`.
//!
//! For every (category, image) pair that has ground truth or detections, the
//! detections are ranked by score (stable: ties keep file order), cut to the largest
//! `maxDets`, matched greedily to ground truth at each IoU threshold and each area
//! range, and the outcome is kept as two bit masks per detection and area range
//! (bit `t`: true positive / false positive at threshold `t`; neither: ignored).
//! That is all `accumulate` needs of pycocotools' `evalImgs`, in a flat layout
//! without per-pair allocations.

use std::collections::HashMap;

use rayon::prelude::*;

use super::format::{CocoAnnotation, CocoDetection, CocoGroundTruth};
use super::{CocoError, AREA_RANGES, MAX_DETS, N_AREAS, N_IOU};

/// pycocotools' `maxDets[-1]`: detections per image and category that are evaluated.
const MAX_DET: usize = MAX_DETS[MAX_DETS.len() - 1];

/// Outcome of one detection at one area range, over the IoU thresholds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DetBits {
    /// Bit `t` set: a true positive at IoU threshold `t`.
    pub tp: u16,
    /// Bit `t` set: a false positive at IoU threshold `t`.
    pub fp: u16,
}

/// One (category, image) pair with ground truth or detections: an `evalImgs` entry
/// per area range.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pair {
    /// Index into the sorted category ids.
    pub cat: u32,
    /// Ground truth of the pair: a range of [`Prepared::gt_order`].
    gt: (u32, u32),
    /// Detections of the pair in file order: a range of [`Prepared::dt_order`].
    dt: (u32, u32),
    /// Where the pair's evaluated (ranked, cut) detections start in the flat arrays.
    pub det_start: u32,
    /// How many of its detections are evaluated (at most `MAX_DET`).
    pub det_len: u32,
}

/// Result of [`evaluate_images`], laid out in pycocotools' `evalImgs` order:
/// category-major, then image id ascending; within a pair, by rank.
#[derive(Debug)]
pub(crate) struct ImageEvals {
    /// The sorted, unique category ids (`params.catIds`).
    pub cat_ids: Vec<i64>,
    /// Pairs in (category, image) order.
    pub pairs: Vec<Pair>,
    /// Per category, the range of `pairs` that belongs to it.
    pub cat_pairs: Vec<(u32, u32)>,
    /// Per pair and area range: ground truth that is not ignored (`npig` terms).
    pub npig: Vec<[u32; N_AREAS]>,
    /// Per evaluated detection: its score.
    pub det_score: Vec<f64>,
    /// Per evaluated detection: its rank within its pair (`0..MAX_DET`).
    pub det_rank: Vec<u8>,
    /// Per evaluated detection: the outcome per area range.
    pub det_bits: Vec<[DetBits; N_AREAS]>,
}

/// The grouping of `_prepare`: which annotations and detections each pair holds,
/// in the order pycocotools lists them.
struct Prepared {
    cat_ids: Vec<i64>,
    /// Ground truth annotation indices, grouped by pair.
    gt_order: Vec<u32>,
    /// Detection indices, grouped by pair, in file order within a pair.
    dt_order: Vec<u32>,
    pairs: Vec<Pair>,
}

/// Checks the detections against the ground truth as pycocotools' `loadRes` does:
/// every detection must name an image of the ground truth.
pub(crate) fn check_images(gt: &CocoGroundTruth, dt: &[CocoDetection]) -> Result<(), CocoError> {
    let images: std::collections::HashSet<i64> = gt.images.iter().map(|i| i.id).collect();
    let mut count = 0usize;
    let mut examples: Vec<i64> = Vec::new();
    for d in dt {
        if !images.contains(&d.image_id) {
            count += 1;
            if examples.len() < 5 && !examples.contains(&d.image_id) {
                examples.push(d.image_id);
            }
        }
    }
    if count == 0 {
        Ok(())
    } else {
        Err(CocoError::UnknownImages { path: None, count, examples })
    }
}

/// Runs `evaluate()` for every (category, image) pair, in parallel.
/// The detections must have passed [`check_images`].
pub(crate) fn evaluate_images(gt: &CocoGroundTruth, dt: &[CocoDetection]) -> ImageEvals {
    let prep = prepare(gt, dt);
    let n_pairs = prep.pairs.len();
    let n_dets = prep.pairs.last().map_or(0, |p| (p.det_start + p.det_len) as usize);

    let mut npig = vec![[0u32; N_AREAS]; n_pairs];
    let mut det_score = vec![0f64; n_dets];
    let mut det_rank = vec![0u8; n_dets];
    let mut det_bits = vec![[DetBits::default(); N_AREAS]; n_dets];

    // Split the pairs into chunks of similar work, each owning the matching
    // (contiguous) part of the output, so threads write without locks.
    let chunks = chunk_bounds(&prep, rayon::current_num_threads() * 8);
    let mut jobs = Vec::with_capacity(chunks.len());
    {
        let (mut npig_rest, mut score_rest, mut rank_rest, mut bits_rest) =
            (npig.as_mut_slice(), det_score.as_mut_slice(), det_rank.as_mut_slice(), det_bits.as_mut_slice());
        for w in chunks.windows(2) {
            let (p0, p1) = (w[0], w[1]);
            let d0 = det_start_of(&prep.pairs, p0);
            let d1 = det_start_of(&prep.pairs, p1);
            let (a, b) = npig_rest.split_at_mut(p1 - p0);
            npig_rest = b;
            let (s, sr) = score_rest.split_at_mut(d1 - d0);
            score_rest = sr;
            let (r, rr) = rank_rest.split_at_mut(d1 - d0);
            rank_rest = rr;
            let (bb, br) = bits_rest.split_at_mut(d1 - d0);
            bits_rest = br;
            jobs.push((p0..p1, a, s, r, bb));
        }
    }
    jobs.into_par_iter().for_each_init(Scratch::default, |scratch, (range, npig, score, rank, bits)| {
        let mut off = 0usize;
        for (slot, p) in range.enumerate() {
            let pair = &prep.pairs[p];
            let n = pair.det_len as usize;
            let gts = &prep.gt_order[pair.gt.0 as usize..pair.gt.1 as usize];
            let dts = &prep.dt_order[pair.dt.0 as usize..pair.dt.1 as usize];
            evaluate_pair(
                &gt.annotations,
                dt,
                gts,
                dts,
                scratch,
                &mut npig[slot],
                &mut score[off..off + n],
                &mut rank[off..off + n],
                &mut bits[off..off + n],
            );
            off += n;
        }
    });

    let mut cat_pairs = vec![(0u32, 0u32); prep.cat_ids.len()];
    let mut start = 0usize;
    while start < n_pairs {
        let cat = prep.pairs[start].cat;
        let mut end = start;
        while end < n_pairs && prep.pairs[end].cat == cat {
            end += 1;
        }
        cat_pairs[cat as usize] = (start as u32, end as u32);
        start = end;
    }

    ImageEvals { cat_ids: prep.cat_ids, pairs: prep.pairs, cat_pairs, npig, det_score, det_rank, det_bits }
}

fn det_start_of(pairs: &[Pair], p: usize) -> usize {
    match pairs.get(p) {
        Some(pair) => pair.det_start as usize,
        None => pairs.last().map_or(0, |l| (l.det_start + l.det_len) as usize),
    }
}

/// Pair indices `0 = b0 < b1 < ... = n` cutting the pairs into about `target`
/// chunks of similar matching work.
fn chunk_bounds(prep: &Prepared, target: usize) -> Vec<usize> {
    let cost = |p: &Pair| {
        let g = (p.gt.1 - p.gt.0) as u64;
        let d = p.det_len as u64;
        N_AREAS as u64 * (N_IOU as u64 * d * g + g) + (p.dt.1 - p.dt.0) as u64 + 1
    };
    let total: u64 = prep.pairs.iter().map(cost).sum();
    let per_chunk = (total / target.max(1) as u64).max(1);
    let mut bounds = vec![0usize];
    let mut acc = 0u64;
    for (i, p) in prep.pairs.iter().enumerate() {
        acc += cost(p);
        if acc >= per_chunk {
            bounds.push(i + 1);
            acc = 0;
        }
    }
    if *bounds.last().unwrap_or(&0) != prep.pairs.len() {
        bounds.push(prep.pairs.len());
    }
    bounds
}

/// Groups annotations and detections by (category, image) as `_prepare` does.
///
/// pycocotools lists ground truth per image (ids ascending), each image's annotations
/// in file order, and then looks every annotation up again *by id* (`loadAnns`), so a
/// duplicated annotation id stands for the last annotation with that id, filed under
/// that one's image and category. This is mirrored so that even such files agree.
fn prepare(gt: &CocoGroundTruth, dt: &[CocoDetection]) -> Prepared {
    let mut img_ids: Vec<i64> = gt.images.iter().map(|i| i.id).collect();
    img_ids.sort_unstable();
    img_ids.dedup();
    let mut cat_ids: Vec<i64> = gt.categories.iter().map(|c| c.id).collect();
    cat_ids.sort_unstable();
    cat_ids.dedup();
    let img_index: HashMap<i64, u32> = img_ids.iter().enumerate().map(|(i, &id)| (id, i as u32)).collect();
    let cat_index: HashMap<i64, u32> = cat_ids.iter().enumerate().map(|(i, &id)| (id, i as u32)).collect();

    // `self.anns[ann['id']] = ann`: the last annotation with an id wins.
    let mut by_id: HashMap<i64, u32> = HashMap::with_capacity(gt.annotations.len());
    for (i, a) in gt.annotations.iter().enumerate() {
        by_id.insert(a.id, i as u32);
    }
    // getAnnIds: images ascending, file order within an image, category filter.
    let mut listed: Vec<(u32, u32)> = gt
        .annotations
        .iter()
        .enumerate()
        .filter(|(_, a)| cat_index.contains_key(&a.category_id))
        .filter_map(|(i, a)| img_index.get(&a.image_id).map(|&img| (img, i as u32)))
        .collect();
    listed.sort_unstable();
    // loadAnns + `_gts[image_id, category_id].append`; the sequence number keeps
    // the listing order inside each group.
    let mut gt_keys: Vec<(u32, u32, u32, u32)> = Vec::with_capacity(listed.len());
    for (seq, &(_, i)) in listed.iter().enumerate() {
        let resolved = by_id[&gt.annotations[i as usize].id];
        let a = &gt.annotations[resolved as usize];
        if let (Some(&cat), Some(&img)) = (cat_index.get(&a.category_id), img_index.get(&a.image_id)) {
            gt_keys.push((cat, img, seq as u32, resolved));
        }
    }
    gt_keys.sort_unstable();

    // Detections have unique ids (loadRes numbers them), so file order it is.
    let mut dt_keys: Vec<(u32, u32, u32)> = dt
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let cat = *cat_index.get(&d.category_id)?;
            let img = *img_index.get(&d.image_id)?;
            Some((cat, img, i as u32))
        })
        .collect();
    dt_keys.sort_unstable();

    let gt_order: Vec<u32> = gt_keys.iter().map(|k| k.3).collect();
    let dt_order: Vec<u32> = dt_keys.iter().map(|k| k.2).collect();

    // Merge the two sorted key lists into the pairs.
    let mut pairs = Vec::new();
    let (mut gi, mut di, mut det_start) = (0usize, 0usize, 0u32);
    while gi < gt_keys.len() || di < dt_keys.len() {
        let gk = gt_keys.get(gi).map(|k| (k.0, k.1));
        let dk = dt_keys.get(di).map(|k| (k.0, k.1));
        let key = match (gk, dk) {
            (Some(g), Some(d)) => g.min(d),
            (Some(g), None) => g,
            (None, Some(d)) => d,
            (None, None) => break,
        };
        let g0 = gi;
        while gi < gt_keys.len() && (gt_keys[gi].0, gt_keys[gi].1) == key {
            gi += 1;
        }
        let d0 = di;
        while di < dt_keys.len() && (dt_keys[di].0, dt_keys[di].1) == key {
            di += 1;
        }
        let det_len = (di - d0).min(MAX_DET) as u32;
        pairs.push(Pair { cat: key.0, gt: (g0 as u32, gi as u32), dt: (d0 as u32, di as u32), det_start, det_len });
        det_start += det_len;
    }

    Prepared { cat_ids, gt_order, dt_order, pairs }
}

/// Buffers reused across pairs by one worker.
#[derive(Default)]
struct Scratch {
    /// Detections ranked by score.
    ranked: Vec<u32>,
    /// IoU, row per ranked detection, column per ground truth in `_gts` order.
    ious: Vec<f64>,
    /// Per ranked detection: its best IoU with any ground truth. Below a threshold,
    /// nothing can match it there, so the scan is skipped.
    max_iou: Vec<f64>,
    det_area: Vec<f64>,
    gt_crowd: Vec<bool>,
    gt_area: Vec<f64>,
    gt_id_nonzero: Vec<bool>,
    /// Ignore flag per ground truth (`_gts` order) for each area range, `[A][G]`.
    ignore: Vec<bool>,
    /// Ground truth in `evaluateImg` order: not ignored first (stable), then ignored.
    sorted_gt: Vec<u32>,
    /// Ignore flag per position of `sorted_gt`.
    sorted_ignore: Vec<bool>,
    /// `gtm[t, :] > 0` per position of `sorted_gt`.
    matched: Vec<bool>,
    /// Matching outcome per area range and ranked detection, `[A][D]`.
    outcome: Vec<MatchBits>,
}

/// How one detection was matched, over the IoU thresholds (bit `t`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct MatchBits {
    /// `dtm != 0`: matched, to a ground truth whose id is not 0.
    nonzero: u16,
    /// Matched to an ignored ground truth (`dtIg = gtIg[m]`).
    ignored: u16,
}

/// `computeIoU` + `evaluateImg` (all four area ranges) for one pair.
#[allow(clippy::too_many_arguments)]
fn evaluate_pair(
    anns: &[CocoAnnotation],
    dets: &[CocoDetection],
    gts: &[u32],
    dts: &[u32],
    s: &mut Scratch,
    npig: &mut [u32; N_AREAS],
    out_score: &mut [f64],
    out_rank: &mut [u8],
    out_bits: &mut [[DetBits; N_AREAS]],
) {
    // np.argsort(-score, kind='mergesort'): descending, ties in file order (the
    // indices ascend within a pair, so they are the stable tie-break).
    s.ranked.clear();
    s.ranked.extend_from_slice(dts);
    s.ranked.sort_unstable_by(|&a, &b| by_score(dets[a as usize].score, dets[b as usize].score).then(a.cmp(&b)));
    s.ranked.truncate(MAX_DET);
    let nd = s.ranked.len();
    let ng = gts.len();
    debug_assert_eq!(nd, out_score.len());

    s.det_area.clear();
    for (r, &d) in s.ranked.iter().enumerate() {
        let det = &dets[d as usize];
        out_score[r] = det.score;
        out_rank[r] = r as u8;
        s.det_area.push(det.bbox[2] * det.bbox[3]);
    }
    s.gt_crowd.clear();
    s.gt_area.clear();
    s.gt_id_nonzero.clear();
    for &g in gts {
        let a = &anns[g as usize];
        s.gt_crowd.push(a.iscrowd);
        s.gt_area.push(a.area);
        s.gt_id_nonzero.push(a.id != 0);
    }

    s.ious.clear();
    s.max_iou.clear();
    if ng > 0 {
        s.ious.resize(nd * ng, 0.0);
        for (r, &d) in s.ranked.iter().enumerate() {
            let db = &dets[d as usize].bbox;
            let row = &mut s.ious[r * ng..(r + 1) * ng];
            let mut best = 0.0f64;
            for (j, &g) in gts.iter().enumerate() {
                let v = box_iou(db, &anns[g as usize].bbox, s.gt_crowd[j]);
                row[j] = v;
                // A NaN IoU (from overflowing boxes) passes pycocotools' `<` test,
                // so such a row must always be scanned.
                best = if v.is_nan() { f64::INFINITY } else { best.max(v) };
            }
            s.max_iou.push(best);
        }
    }

    // gt['ignore'] is iscrowd; `_ignore` adds the area range (bounds inclusive).
    s.ignore.clear();
    for &(lo, hi) in AREA_RANGES.iter() {
        for j in 0..ng {
            s.ignore.push(s.gt_crowd[j] || area_outside(s.gt_area[j], lo, hi));
        }
    }
    s.outcome.clear();
    s.outcome.resize(N_AREAS * nd, MatchBits::default());
    for (a, npig_a) in npig.iter_mut().enumerate() {
        let ignore = &s.ignore[a * ng..(a + 1) * ng];
        *npig_a = ignore.iter().filter(|&&i| !i).count() as u32;
        if ng == 0 || nd == 0 {
            continue;
        }
        // The matching depends on the area range only through the ignore flags;
        // where an earlier range had the same flags, its outcome is this one's.
        if let Some(b) = (0..a).find(|&b| s.ignore[b * ng..(b + 1) * ng] == *ignore) {
            s.outcome.copy_within(b * nd..(b + 1) * nd, a * nd);
            continue;
        }
        match_area(s, a, nd, ng);
    }

    let all = (1u16 << N_IOU) - 1;
    for (a, &(lo, hi)) in AREA_RANGES.iter().enumerate() {
        let outcomes = &s.outcome[a * nd..(a + 1) * nd];
        for ((bits, &o), &area) in out_bits.iter_mut().zip(outcomes).zip(&s.det_area) {
            // dtIg = gtIg[m] where matched; then dtIg |= (dtm == 0) & outside-area.
            let outside = if area_outside(area, lo, hi) { !o.nonzero & all } else { 0 };
            let ignored = o.ignored | outside;
            bits[a] = DetBits { tp: o.nonzero & !ignored & all, fp: !o.nonzero & !ignored & all };
        }
    }
}

/// The greedy matching of `evaluateImg` for one area range, all thresholds.
fn match_area(s: &mut Scratch, a: usize, nd: usize, ng: usize) {
    let ignore = &s.ignore[a * ng..(a + 1) * ng];
    s.sorted_gt.clear();
    s.sorted_ignore.clear();
    for flag in [false, true] {
        for (j, &ig) in ignore.iter().enumerate() {
            if ig == flag {
                s.sorted_gt.push(j as u32);
                s.sorted_ignore.push(ig);
            }
        }
    }
    for (t, &thr) in super::iou_thresholds().iter().enumerate() {
        s.matched.clear();
        s.matched.resize(ng, false);
        let bit = 1u16 << t;
        let best0 = thr.min(1.0 - 1e-10);
        for r in 0..nd {
            if s.max_iou[r] < best0 {
                continue;
            }
            let row = &s.ious[r * ng..(r + 1) * ng];
            let mut best = best0;
            let mut m: Option<usize> = None;
            for (pos, &j) in s.sorted_gt.iter().enumerate() {
                let j = j as usize;
                // Already matched, and not a crowd: skip.
                if s.matched[pos] && !s.gt_crowd[j] {
                    continue;
                }
                // Matched to a regular gt and reached the ignored ones: stop.
                if let Some(mp) = m {
                    if !s.sorted_ignore[mp] && s.sorted_ignore[pos] {
                        break;
                    }
                }
                // `<` not `<=`: an equal IoU moves the match to the later gt.
                if row[j] < best {
                    continue;
                }
                best = row[j];
                m = Some(pos);
            }
            if let Some(pos) = m {
                s.matched[pos] = true;
                let o = &mut s.outcome[a * nd + r];
                if s.gt_id_nonzero[s.sorted_gt[pos] as usize] {
                    o.nonzero |= bit;
                }
                if s.sorted_ignore[pos] {
                    o.ignored |= bit;
                }
            }
        }
    }
}

/// The order of `np.argsort(-score)`: higher scores first, NaN last (numpy sorts
/// NaN to the end), and a total order, so sorting never sees an inconsistent
/// comparison.
pub(crate) fn by_score(a: f64, b: f64) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

/// `area < aRng[0] or area > aRng[1]`.
fn area_outside(area: f64, lo: f64, hi: f64) -> bool {
    area < lo || area > hi
}

/// IoU of a detection and a ground truth box (`[x, y, w, h]`), exactly as
/// pycocotools' `bbIou` (maskApi.c) computes it: for a crowd ground truth the union
/// is the detection's own area, so a detection inside a crowd region scores 1.
pub(crate) fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let da = d[2] * d[3];
    let u = if crowd { da } else { da + g[2] * g[3] - i };
    i / u
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::coco::format::{CocoCategory, CocoImage};

    #[test]
    fn iou_regular_and_crowd() {
        let g = [0.0, 0.0, 10.0, 10.0];
        let d = [5.0, 0.0, 10.0, 10.0];
        // Overlap 50, union 150.
        assert_eq!(box_iou(&d, &g, false), 50.0 / 150.0);
        // Crowd: intersection over the detection's area.
        assert_eq!(box_iou(&d, &g, true), 0.5);
        let inside = [2.0, 2.0, 3.0, 3.0];
        assert_eq!(box_iou(&inside, &g, true), 1.0);
        assert_eq!(box_iou(&inside, &g, false), 9.0 / 100.0);
        // Touching edges and disjoint boxes do not overlap.
        assert_eq!(box_iou(&[10.0, 0.0, 5.0, 5.0], &g, false), 0.0);
        assert_eq!(box_iou(&[0.0, 20.0, 5.0, 5.0], &g, true), 0.0);
    }

    fn ann(id: i64, bbox: [f64; 4], crowd: bool) -> CocoAnnotation {
        CocoAnnotation { id, image_id: 1, category_id: 1, bbox, area: bbox[2] * bbox[3], iscrowd: crowd, ignore: None }
    }

    fn det(bbox: [f64; 4], score: f64) -> CocoDetection {
        CocoDetection { image_id: 1, category_id: 1, bbox, score }
    }

    fn gt_with(anns: Vec<CocoAnnotation>) -> CocoGroundTruth {
        CocoGroundTruth {
            info: None,
            images: vec![CocoImage { id: 1, ..Default::default() }],
            annotations: anns,
            categories: vec![CocoCategory { id: 1, name: "a".into(), supercategory: None }],
        }
    }

    #[test]
    fn crowd_region_absorbs_many_detections_without_false_positives() {
        // One regular object and one crowd region; three detections in the crowd.
        let gt = gt_with(vec![ann(1, [0.0, 0.0, 10.0, 10.0], false), ann(2, [100.0, 100.0, 100.0, 100.0], true)]);
        let dt = vec![
            det([0.0, 0.0, 10.0, 10.0], 0.9),
            det([110.0, 110.0, 20.0, 20.0], 0.8),
            det([150.0, 150.0, 20.0, 20.0], 0.7),
            det([120.0, 160.0, 20.0, 20.0], 0.6),
        ];
        let ev = evaluate_images(&gt, &dt);
        assert_eq!(ev.npig[0][0], 1, "the crowd region is ignored");
        let all = (1u16 << N_IOU) - 1;
        assert_eq!(ev.det_bits[0][0], DetBits { tp: all, fp: 0 });
        for r in 1..4 {
            // Matched to the ignored crowd at every threshold: neither tp nor fp.
            assert_eq!(ev.det_bits[r][0], DetBits::default(), "detection {r}");
        }
    }

    #[test]
    fn equal_iou_moves_the_match_to_the_later_ground_truth() {
        // Two identical objects, the later with id 0 (a match to it reads as none).
        // The first detection's tie goes to the later object, so it comes out as a
        // false positive and the second detection takes the first object.
        let gt = gt_with(vec![ann(5, [0.0, 0.0, 10.0, 10.0], false), ann(0, [0.0, 0.0, 10.0, 10.0], false)]);
        let dt = vec![det([0.0, 0.0, 10.0, 10.0], 0.9), det([0.0, 0.0, 10.0, 10.0], 0.8)];
        let ev = evaluate_images(&gt, &dt);
        let all = (1u16 << N_IOU) - 1;
        assert_eq!(ev.det_bits[0][0], DetBits { tp: 0, fp: all });
        assert_eq!(ev.det_bits[1][0], DetBits { tp: all, fp: 0 });
    }

    #[test]
    fn a_regular_match_stops_the_search_before_ignored_ground_truth() {
        // The detection overlaps a regular object with IoU 0.6 and a crowd region
        // (ignored) with IoU 1. Up to 0.6 it stays with the regular object; above,
        // only the crowd qualifies and the detection is ignored.
        let gt = gt_with(vec![ann(1, [0.0, 0.0, 10.0, 6.0], false), ann(2, [0.0, 0.0, 20.0, 20.0], true)]);
        let dt = vec![det([0.0, 0.0, 10.0, 10.0], 0.9)];
        let ev = evaluate_images(&gt, &dt);
        let thrs = crate::eval::coco::iou_thresholds();
        for (t, &thr) in thrs.iter().enumerate() {
            let bits = ev.det_bits[0][0];
            if thr <= 0.6 {
                assert_eq!((bits.tp >> t) & 1, 1, "threshold {thr}");
            } else {
                assert_eq!(bits, DetBits { tp: bits.tp, fp: 0 });
                assert_eq!((bits.tp >> t) & 1, 0, "threshold {thr}");
            }
        }
    }

    #[test]
    fn ground_truth_id_zero_counts_as_unmatched() {
        let gt = gt_with(vec![ann(0, [0.0, 0.0, 10.0, 10.0], false)]);
        let dt = vec![det([0.0, 0.0, 10.0, 10.0], 0.5)];
        let ev = evaluate_images(&gt, &dt);
        assert_eq!(ev.det_bits[0][0].tp, 0);
        assert_eq!(ev.det_bits[0][0].fp, (1u16 << N_IOU) - 1);
    }

    #[test]
    fn nan_scores_rank_last_and_overflowing_boxes_do_not_panic() {
        let gt = gt_with(vec![ann(1, [0.0, 0.0, 10.0, 10.0], false), ann(2, [0.0, 0.0, 1e200, 1e200], false)]);
        let mut dt: Vec<CocoDetection> = (0..40)
            .map(|i| {
                let score = if i % 3 == 0 { f64::NAN } else { f64::from(i) };
                det([0.0, 0.0, 10.0, 10.0], score)
            })
            .collect();
        dt.push(det([0.0, 0.0, 1e300, 1e300], 0.5));
        let ev = evaluate_images(&gt, &dt);
        assert_eq!(ev.det_score[0], 38.0);
        assert!(ev.det_score[26].is_finite());
        assert!(ev.det_score[27..].iter().all(|s| s.is_nan()));
        let acc = crate::eval::coco::accumulate::accumulate(&ev);
        assert_eq!(acc.cat_ids, vec![1]);
    }

    #[test]
    fn only_the_best_hundred_detections_are_kept() {
        let gt = gt_with(vec![ann(1, [0.0, 0.0, 10.0, 10.0], false)]);
        let dt: Vec<CocoDetection> = (0..150).map(|i| det([0.0, 0.0, 10.0, 10.0], f64::from(i) / 150.0)).collect();
        let ev = evaluate_images(&gt, &dt);
        assert_eq!(ev.det_score.len(), 100);
        assert_eq!(ev.det_score[0], 149.0 / 150.0);
        assert_eq!(ev.det_score[99], 50.0 / 150.0);
    }
}
