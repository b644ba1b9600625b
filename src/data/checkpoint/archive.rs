//! The zip container `torch.save` writes: `<archive>/data.pkl`, `<archive>/data/<key>`
//! per storage, `<archive>/byteorder`, `<archive>/version` and a few bookkeeping records.
//! `<archive>` is the file's stem when torch saved to a path, `archive` for a buffer.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use zip::result::ZipError;
use zip::{ZipArchive, ZipReadOptions};

use super::CheckpointError;

/// An open checkpoint archive.
pub(crate) struct Archive<R: Read + Seek> {
    zip: ZipArchive<R>,
    path: PathBuf,
    /// `<archive>/` including the slash (empty when records sit at the root).
    prefix: String,
    /// Whether the `byteorder` record says `big`.
    pub big_endian: bool,
    /// File size, the bound on how much a stored record can hold.
    file_len: u64,
}

/// Pickle protocol 2..=5 header: what a pre-1.6 (non-zip) torch.save file starts with.
fn is_legacy_pickle(head: &[u8]) -> bool {
    matches!(head, [0x80, 2..=5, ..])
}

/// The tar format of torch < 0.4 carries "ustar" at offset 257.
fn is_legacy_tar(head: &[u8]) -> bool {
    head.get(257..262) == Some(b"ustar")
}

impl<R: Read + Seek> Archive<R> {
    /// Open `reader` (the content of `path`) as a torch.save zip archive.
    pub fn open(mut reader: R, path: &Path) -> Result<Self, CheckpointError> {
        let io_err = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let file_len = reader.seek(SeekFrom::End(0)).map_err(io_err)?;
        reader.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let mut head = Vec::with_capacity(512);
        (&mut reader).take(512).read_to_end(&mut head).map_err(io_err)?;
        reader.seek(SeekFrom::Start(0)).map_err(io_err)?;
        if !head.starts_with(b"PK") {
            return Err(if is_legacy_pickle(&head) || is_legacy_tar(&head) {
                CheckpointError::LegacyFormat { path: path.to_path_buf() }
            } else {
                CheckpointError::NotZip { path: path.to_path_buf() }
            });
        }
        let zip = ZipArchive::new(reader).map_err(|e| CheckpointError::CorruptZip { path: path.to_path_buf(), detail: e.to_string() })?;
        // Two records with one name would let a damaged directory swap one tensor's bytes
        // for another's without any checksum failing.
        if zip.has_duplicate_names() {
            return Err(CheckpointError::CorruptZip {
                path: path.to_path_buf(),
                detail: "duplicate record names in the zip directory".to_owned(),
            });
        }
        let prefix = find_prefix(&zip).ok_or_else(|| CheckpointError::MissingDataPkl {
            path: path.to_path_buf(),
            entries: zip.file_names().take(8).filter_map(|n| n.ok().map(|n| n.into_owned())).collect(),
        })?;
        let mut archive = Archive { zip, path: path.to_path_buf(), prefix, big_endian: false, file_len };
        // No byteorder record means little-endian: torch wrote none before 1.11 (and
        // only little-endian machines ran it in practice).
        if let Some(order) = archive.record("byteorder", |_| Ok(()))? {
            match order.as_slice() {
                b"little" => {}
                b"big" => archive.big_endian = true,
                other => {
                    return Err(CheckpointError::BadByteOrder {
                        path: path.to_path_buf(),
                        value: String::from_utf8_lossy(other).into_owned(),
                    })
                }
            }
        }
        Ok(archive)
    }

    /// Full name of the record `name` (`<archive>/name`), for messages.
    pub fn record_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The size of the checkpoint file.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The bytes of `<archive>/data.pkl`.
    pub fn data_pkl(&mut self) -> Result<Vec<u8>, CheckpointError> {
        match self.record("data.pkl", |_| Ok(()))? {
            Some(bytes) => Ok(bytes),
            None => Err(CheckpointError::MissingDataPkl { path: self.path.clone(), entries: Vec::new() }),
        }
    }

    /// The bytes of record `<archive>/<name>`, `None` when the archive has no such record.
    /// Reading checks the record's CRC, so damaged data is an error, not wrong weights.
    /// `admit` sees the record's declared size before anything is allocated for it, and
    /// refuses it with an error (a budget).
    pub fn record(
        &mut self,
        name: &str,
        admit: impl FnOnce(u64) -> Result<(), CheckpointError>,
    ) -> Result<Option<Vec<u8>>, CheckpointError> {
        self.read_record(name, admit)
    }

    /// Record `<archive>/<name>` read straight into float32 values (native byte order: the
    /// caller checks that it is the archive's), `None` when there is no such record;
    /// `admit` as for [`Archive::record`].
    pub fn record_f32(
        &mut self,
        name: &str,
        admit: impl FnOnce(u64) -> Result<(), CheckpointError>,
    ) -> Result<Option<Vec<f32>>, CheckpointError> {
        self.read_record(name, admit)
    }

    /// A record as elements of `T`, read into one buffer of the declared size.
    fn read_record<T: bytemuck::Pod>(
        &mut self,
        name: &str,
        admit: impl FnOnce(u64) -> Result<(), CheckpointError>,
    ) -> Result<Option<Vec<T>>, CheckpointError> {
        let full = self.record_name(name);
        let corrupt = |path: &Path, e: &dyn std::fmt::Display| CheckpointError::CorruptZip {
            path: path.to_path_buf(),
            detail: format!("record {full}: {e}"),
        };
        let file_len = self.file_len;
        // Header consistency: the local header must agree with the directory entry (name,
        // sizes, CRC), so a damaged directory cannot point a name at another record.
        let options = ZipReadOptions::new().enforce_header_consistency(true);
        let mut file = match self.zip.by_name_with_options(&full, options) {
            Ok(f) => f,
            Err(ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(corrupt(&self.path, &e)),
        };
        // torch stores records uncompressed, so a record larger than the file is a lie
        // of a damaged directory: refused before allocating it.
        let declared = file.size();
        let elem = std::mem::size_of::<T>() as u64;
        if declared > file_len {
            return Err(corrupt(&self.path, &format!("declares {declared} bytes, more than the file's {file_len}")));
        }
        if declared % elem != 0 {
            return Err(corrupt(&self.path, &format!("holds {declared} bytes, not a whole number of {elem}-byte elements")));
        }
        let n = usize::try_from(declared / elem).map_err(|e| corrupt(&self.path, &e))?;
        admit(declared)?;
        // Zeroed by the allocator (fresh pages from the OS), not by a pass over the buffer;
        // bounded by the file's size, checked above.
        let mut values: Vec<T> = bytemuck::zeroed_vec(n);
        file.read_exact(bytemuck::cast_slice_mut(&mut values))
            .map_err(|e| corrupt(&self.path, &format!("holds fewer bytes than the {declared} its directory says ({e})")))?;
        // Reading on to the end checks the CRC, and that nothing follows. One byte at most:
        // a compressed record can inflate to any size past what its directory says.
        let mut rest = Vec::new();
        (&mut file).take(1).read_to_end(&mut rest).map_err(|e| corrupt(&self.path, &e))?;
        if !rest.is_empty() {
            return Err(corrupt(&self.path, &format!("holds more bytes than the {declared} its directory says")));
        }
        Ok(Some(values))
    }
}

/// The `<archive>/` folder holding `data.pkl`. torch names it after the first record's
/// folder; other top-level `*/data.pkl` records are accepted when that one has none.
fn find_prefix<R: Read + Seek>(zip: &ZipArchive<R>) -> Option<String> {
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.into_owned())).collect();
    let is_data_pkl = |name: &str| match name.strip_suffix("data.pkl") {
        Some("") => true,
        Some(folder) => folder.ends_with('/') && folder.matches('/').count() == 1,
        None => false,
    };
    let first_folder = names.first().and_then(|n| n.split_once('/')).map(|(folder, _)| format!("{folder}/"));
    if let Some(folder) = first_folder {
        if names.iter().any(|n| *n == format!("{folder}data.pkl")) {
            return Some(folder);
        }
    }
    names.iter().find(|n| is_data_pkl(n)).map(|n| n.trim_end_matches("data.pkl").to_owned())
}
