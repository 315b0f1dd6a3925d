//! Spectral entries: which `n` positions `(u_l, v_l)` of a layer's `d1 x d2` spectrum an adapter
//! trains.
//!
//! Conventions, used throughout the crate: `d1` is the number of rows (`out_features`), `d2` the
//! number of columns (`in_features`), as candle's `Linear` stores its weight; `u` is a row in
//! `0..d1`, `v` a column in `0..d2`; the flat index of `(u, v)` is `u*d2 + v` (row-major). Entry
//! `l` pairs with coefficient `l` of the adapter's spectrum tensor.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use crate::error::{Error, Result};

mod frequency;
pub(crate) mod torch_rng;

/// How the `n` spectral positions of an adapter are chosen.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum EntrySampling {
    /// PEFT's choice: the first `n` values of `torch.randperm(d1*d2)` from a generator seeded
    /// with the seed, as flat indices `u*d2 + v`; bit-exact with PEFT. The default.
    #[default]
    Uniform,
    /// Frequency-biased sampling without replacement (FourierFT paper, Eq. 5), seeded with the
    /// seed: weight `exp(-((D² - center²) / (D·width))²)` where `D` is the distance from DC in
    /// signed frequencies. See [`SpectralEntries::frequency_biased`].
    FrequencyBiased {
        /// Band center `fc`, in frequency-index units; finite and `>= 0`.
        center: f64,
        /// Band width `W`, in frequency-index units; finite and `> 0`.
        width: f64,
    },
    /// User-given `(row, col)` positions, in coefficient order; `n` must equal their number and
    /// the seed is ignored.
    Explicit(Vec<(usize, usize)>),
}

/// `n >= 1` distinct spectral positions `(u_l, v_l)` of a `d1 x d2` spectrum, `u` in `0..d1`
/// (rows, `out_features`) and `v` in `0..d2` (columns, `in_features`); entry `l` pairs with
/// coefficient `l`.
///
/// Built only through the validating constructors, so it always holds at least one entry, no
/// duplicates and only in-range positions. [`SpectralEntries::uniform`] and
/// [`SpectralEntries::frequency_biased`] return a shared [`Arc`]: layers with the same shape,
/// `n`, seed and method share one allocation, as PEFT shares positions between them.
///
/// ```
/// use fourierft::SpectralEntries;
/// let e = SpectralEntries::uniform(768, 768, 6, 777)?;
/// // PEFT: torch.randperm(768*768, generator=torch.Generator().manual_seed(777))[:6]
/// assert_eq!(e.flat_indices(), vec![391271, 183699, 413551, 384200, 435559, 59955]);
/// assert_eq!((e.rows()[0], e.cols()[0]), (391271 / 768, 391271 % 768));
/// # Ok::<(), fourierft::Error>(())
/// ```
#[derive(Debug, PartialEq)]
pub struct SpectralEntries {
    d1: usize,
    d2: usize,
    rows: Vec<u32>,
    cols: Vec<u32>,
    groups: ColumnGroups,
}

/// The entries grouped by column `v` (CSR layout), computed once when the entries are built and
/// used by the FFT path.
///
/// ```
/// use fourierft::SpectralEntries;
/// let e = SpectralEntries::explicit(4, 4, &[(0, 3), (1, 0), (2, 3)])?;
/// let g = fourierft::internals::column_groups(&e);
/// assert_eq!(g.columns, vec![0, 3]);
/// assert_eq!(g.offsets, vec![0, 1, 3]);
/// assert_eq!(g.entries, vec![1, 0, 2]);
/// assert_eq!(g.iter().collect::<Vec<_>>(), vec![(0, &[1][..]), (3, &[0, 2][..])]);
/// # Ok::<(), fourierft::Error>(())
/// ```
#[doc(hidden)]
#[derive(Debug, PartialEq)]
pub struct ColumnGroups {
    /// Distinct columns, ascending.
    pub columns: Vec<u32>,
    /// `offsets.len() == columns.len() + 1`; the entries of `columns[g]` are
    /// `entries[offsets[g]..offsets[g + 1]]`.
    pub offsets: Vec<usize>,
    /// Entry indices `l` (into `rows()`/`cols()`), grouped by column, ascending `l` within a
    /// group.
    pub entries: Vec<u32>,
}

impl ColumnGroups {
    /// Groups entry indices by column in `O(n log n)`.
    fn build(cols: &[u32]) -> Self {
        let mut entries: Vec<u32> = (0..cols.len() as u32).collect();
        // Stable, so indices stay ascending within a column.
        entries.sort_by_key(|&l| cols[l as usize]);
        let mut columns = Vec::new();
        let mut offsets = Vec::new();
        for (i, &l) in entries.iter().enumerate() {
            let c = cols[l as usize];
            if columns.last() != Some(&c) {
                columns.push(c);
                offsets.push(i);
            }
        }
        offsets.push(entries.len());
        Self {
            columns,
            offsets,
            entries,
        }
    }

    /// `(column, entry indices)` for every group, columns ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u32])> + '_ {
        self.columns
            .iter()
            .zip(self.offsets.windows(2))
            .map(|(&c, w)| (c, &self.entries[w[0]..w[1]]))
    }
}

/// Checks `d1, d2 < 2^32` (else [`Error::Config`]) and `1 <= n <= d1*d2` (else
/// [`Error::EntryCount`], which also covers `d1 == 0` or `d2 == 0`).
fn check_count(context: &str, d1: usize, d2: usize, n: usize) -> Result<()> {
    for (name, d) in [("d1 (out_features)", d1), ("d2 (in_features)", d2)] {
        if u32::try_from(d).is_err() {
            return Err(Error::Config(format!(
                "{context}: {name} = {d} is too large (must be < 2^32)"
            )));
        }
    }
    let total = d1 as u64 * d2 as u64;
    if n == 0 || n as u64 > total {
        return Err(Error::EntryCount {
            context: context.to_string(),
            n,
            max: usize::try_from(total).unwrap_or(usize::MAX),
            d1,
            d2,
        });
    }
    Ok(())
}

/// Cache key: shape, count, seed, method tag and method parameters as bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct CacheKey {
    d1: usize,
    d2: usize,
    n: usize,
    seed: u64,
    method: u8,
    params: [u64; 2],
}

type Cache = Mutex<HashMap<CacheKey, Weak<SpectralEntries>>>;

/// Locks the process-wide cache; a poisoned lock is recovered (the map stays consistent).
fn lock_cache() -> MutexGuard<'static, HashMap<CacheKey, Weak<SpectralEntries>>> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    crate::sync::lock(CACHE.get_or_init(Default::default))
}

/// Returns the live cached entries for `key`, or builds, caches (weakly) and returns them.
/// Building happens outside the lock, so distinct shapes build in parallel; if two threads race
/// on one key, the first stored result wins and is shared.
fn cached(
    key: CacheKey,
    build: impl FnOnce() -> Result<SpectralEntries>,
) -> Result<Arc<SpectralEntries>> {
    let hit = lock_cache().get(&key).and_then(Weak::upgrade);
    if let Some(hit) = hit {
        return Ok(hit);
    }
    let built = Arc::new(build()?);
    let mut map = lock_cache();
    if let Some(hit) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(hit);
    }
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(key, Arc::downgrade(&built));
    Ok(built)
}

impl SpectralEntries {
    /// Builds from validated in-range, distinct flat indices `u*d2 + v`.
    fn from_flat(d1: usize, d2: usize, flat: &[u64]) -> Self {
        let d2w = d2 as u64;
        let rows = flat.iter().map(|&f| (f / d2w) as u32).collect();
        let cols: Vec<u32> = flat.iter().map(|&f| (f % d2w) as u32).collect();
        let groups = ColumnGroups::build(&cols);
        Self {
            d1,
            d2,
            rows,
            cols,
            groups,
        }
    }

    /// PEFT's entries, bit-exact: flat indices `torch.randperm(d1*d2, generator=
    /// torch.Generator().manual_seed(seed))[:n]` in that order, `u = idx / d2`, `v = idx % d2`.
    ///
    /// Shared through a process-wide cache of weak references. Costs `O(n)` when
    /// `d1*d2 < 214,748,364`; at or above that, torch's other `randperm` branch forces `O(d1*d2)`
    /// time (still `O(n)` memory), see `torch_rng::randperm_prefix`.
    ///
    /// # Errors
    /// [`Error::EntryCount`] unless `1 <= n <= d1*d2`; [`Error::Config`] if `d1` or `d2` is
    /// `>= 2^32`.
    pub fn uniform(d1: usize, d2: usize, n: usize, seed: u64) -> Result<Arc<Self>> {
        check_count("uniform spectral entries", d1, d2, n)?;
        let key = CacheKey {
            d1,
            d2,
            n,
            seed,
            method: 0,
            params: [0, 0],
        };
        cached(key, || {
            let flat = torch_rng::randperm_prefix(d1 as u64 * d2 as u64, n, seed);
            Ok(Self::from_flat(d1, d2, &flat))
        })
    }

    /// `n` distinct positions sampled without replacement with probability proportional to the
    /// FourierFT paper's Eq. 5 weight `w(u, v) = exp(-((D² - center²) / (D·width))²)`, seeded
    /// with `rand::rngs::StdRng::seed_from_u64(seed)`.
    ///
    /// `D = sqrt(fu² + fv²)` is the distance from DC, with signed frequencies `fu = u` if
    /// `u <= d1/2` else `u - d1` (likewise `fv`), so low frequencies sit near DC; `center` and
    /// `width` are in the same frequency-index units. At `D = 0` the weight is `1` if
    /// `center == 0`, else `0`. Entries come in sampling order: entry 0 was drawn first, each
    /// next one with probability `∝ w` among the positions not drawn yet. Costs
    /// `O(d1·d2·log n)` time and `O(n)` memory; shared like [`SpectralEntries::uniform`].
    /// Determinism across versions of this crate follows `rand`'s `StdRng` stability.
    ///
    /// ```
    /// use fourierft::SpectralEntries;
    /// let e = SpectralEntries::frequency_biased(64, 64, 20, 7, 0.0, 2.0)?;
    /// assert_eq!(e.len(), 20);
    /// # Ok::<(), fourierft::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::EntryCount`] unless `1 <= n <= d1*d2`; [`Error::Config`] if `d1` or `d2` is
    /// `>= 2^32`, `center` is not finite and `>= 0`, `width` is not finite and `> 0`, or fewer
    /// than `n` positions have positive weight.
    pub fn frequency_biased(
        d1: usize,
        d2: usize,
        n: usize,
        seed: u64,
        center: f64,
        width: f64,
    ) -> Result<Arc<Self>> {
        check_count("frequency-biased spectral entries", d1, d2, n)?;
        // + 0.0 maps -0.0 to 0.0 so both share one cache slot.
        let key = CacheKey {
            d1,
            d2,
            n,
            seed,
            method: 1,
            params: [(center + 0.0).to_bits(), width.to_bits()],
        };
        cached(key, || {
            let flat = frequency::sample(d1, d2, n, seed, center, width)?;
            Ok(Self::from_flat(d1, d2, &flat))
        })
    }

    /// The given `(row, col)` positions, in order (entry `l` is `positions[l]`). Not cached.
    ///
    /// # Errors
    /// [`Error::EntryCount`] unless `1 <= positions.len() <= d1*d2`; [`Error::Config`] if `d1`
    /// or `d2` is `>= 2^32`; [`Error::EntryOutOfRange`] for the first position outside the
    /// spectrum; [`Error::DuplicateEntry`] with both indices for the first repeated position.
    pub fn explicit(d1: usize, d2: usize, positions: &[(usize, usize)]) -> Result<Arc<Self>> {
        check_count("explicit spectral entries", d1, d2, positions.len())?;
        let mut seen: HashMap<(usize, usize), usize> = HashMap::with_capacity(positions.len());
        let mut rows = Vec::with_capacity(positions.len());
        let mut cols = Vec::with_capacity(positions.len());
        for (index, &(row, col)) in positions.iter().enumerate() {
            if row >= d1 || col >= d2 {
                return Err(Error::EntryOutOfRange {
                    index,
                    row,
                    col,
                    d1,
                    d2,
                });
            }
            if let Some(&first) = seen.get(&(row, col)) {
                return Err(Error::DuplicateEntry {
                    row,
                    col,
                    first,
                    second: index,
                });
            }
            seen.insert((row, col), index);
            // In range of d1, d2 < 2^32, so these fit.
            rows.push(row as u32);
            cols.push(col as u32);
        }
        let groups = ColumnGroups::build(&cols);
        Ok(Arc::new(Self {
            d1,
            d2,
            rows,
            cols,
            groups,
        }))
    }

    /// Dispatches on `sampling`. For [`EntrySampling::Explicit`] the seed is ignored and `n` must
    /// equal the number of positions.
    ///
    /// # Errors
    /// Those of the chosen constructor, and [`Error::EntryCount`] (with `max` set to the number
    /// of explicit positions) when `n` differs from it.
    pub fn sample(
        d1: usize,
        d2: usize,
        n: usize,
        seed: u64,
        sampling: &EntrySampling,
    ) -> Result<Arc<Self>> {
        match sampling {
            EntrySampling::Uniform => Self::uniform(d1, d2, n, seed),
            EntrySampling::FrequencyBiased { center, width } => {
                Self::frequency_biased(d1, d2, n, seed, *center, *width)
            }
            EntrySampling::Explicit(positions) if positions.len() != n => Err(Error::EntryCount {
                context: format!(
                    "explicit spectral entries (n_frequency must equal the {} given positions)",
                    positions.len()
                ),
                n,
                max: positions.len(),
                d1,
                d2,
            }),
            EntrySampling::Explicit(positions) => Self::explicit(d1, d2, positions),
        }
    }

    /// Rows of the spectrum (`out_features`).
    pub fn d1(&self) -> usize {
        self.d1
    }

    /// Columns of the spectrum (`in_features`).
    pub fn d2(&self) -> usize {
        self.d2
    }

    /// `(d1, d2)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.d1, self.d2)
    }

    /// The number of entries `n` (always `>= 1`).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Always `false` for entries built by the constructors (`n >= 1`).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Row `u_l` of every entry, in `0..d1`.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// Column `v_l` of every entry, in `0..d2`.
    pub fn cols(&self) -> &[u32] {
        &self.cols
    }

    /// Flat indices `u_l*d2 + v_l`; for [`SpectralEntries::uniform`] exactly PEFT's
    /// `randperm(d1*d2)[:n]`, in order.
    pub fn flat_indices(&self) -> Vec<u64> {
        let d2 = self.d2 as u64;
        self.rows
            .iter()
            .zip(&self.cols)
            .map(|(&u, &v)| u as u64 * d2 + v as u64)
            .collect()
    }

    /// The entries grouped by column.
    pub(crate) fn column_groups(&self) -> &ColumnGroups {
        &self.groups
    }
}
