//! One core per group of prompts. The stock model takes no padding mask, so a batch runs as one
//! forward per prompt length; on such short sequences candle's GEMMs keep two cores only partly
//! busy and its elementwise kernels run on one (measured on 2 cores: 5872 ms per step on one
//! thread, 5211 ms on two). Instead each core takes whole groups, on its own one-thread rayon
//! pool, runs their forward and backward, and the gradients are summed: gradient accumulation,
//! the batch's mean loss split into each group's share, the same step up to summation order.

use anyhow::{anyhow, Result};
use candle_core::backprop::GradStore;
use candle_core::Var;

/// One single-threaded rayon pool per worker (candle's kernels and ours run on the pool they
/// are called from).
pub(crate) struct Workers {
    pools: Vec<rayon::ThreadPool>,
}

impl Workers {
    /// As many workers as rayon's global pool has threads (`RAYON_NUM_THREADS`, else the cores).
    pub(crate) fn new() -> Result<Self> {
        let pools = (0..rayon::current_num_threads())
            .map(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { pools })
    }

    pub(crate) fn len(&self) -> usize {
        self.pools.len()
    }

    /// `f(share)` for every share, each on its own worker, in parallel; results in share order.
    pub(crate) fn run<U: Sync, T: Send>(
        &self,
        shares: &[Vec<U>],
        f: impl Fn(&[U]) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = shares
                .iter()
                .zip(self.pools.iter().cycle())
                .map(|(share, pool)| s.spawn(move || pool.install(|| f(share))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("a worker thread panicked"))?)
                .collect()
        })
    }
}

/// Deals same-length groups of prompts (`cost` = a group's tokens) into at most `workers`
/// shares of about equal cost: a group costing more than a fair share is halved first (while
/// it has two prompts), then the costliest goes to the cheapest share. Empty shares are dropped.
pub(crate) fn balance(
    groups: Vec<Vec<usize>>,
    cost: impl Fn(&[usize]) -> usize,
    workers: usize,
) -> Vec<Vec<Vec<usize>>> {
    let workers = workers.max(1);
    let total: usize = groups.iter().map(|g| cost(g)).sum();
    let fair = total.div_ceil(workers);
    let mut units = Vec::new();
    let mut todo = groups;
    while let Some(g) = todo.pop() {
        if g.len() >= 2 && cost(&g) > fair {
            let (a, b) = g.split_at(g.len() / 2);
            todo.push(a.to_vec());
            todo.push(b.to_vec());
        } else if !g.is_empty() {
            units.push(g);
        }
    }
    units.sort_by_key(|g| std::cmp::Reverse(cost(g)));
    let mut shares: Vec<(usize, Vec<Vec<usize>>)> = vec![(0, Vec::new()); workers];
    for g in units {
        let Some(least) = shares.iter_mut().min_by_key(|(c, _)| *c) else {
            break;
        };
        least.0 += cost(&g);
        least.1.push(g);
    }
    shares
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| !s.is_empty())
        .collect()
}

/// `into[v] += from[v]` for each parameter `v`.
pub(crate) fn add_grads(into: &mut GradStore, from: &GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        let sum = match (into.get(v.as_tensor()), from.get(v.as_tensor())) {
            (Some(a), Some(b)) => (a + b)?,
            (None, Some(b)) => b.clone(),
            _ => continue,
        };
        into.insert(v.as_tensor(), sum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_splits_big_groups_and_evens_the_load() {
        let cost = |g: &[usize]| g.len() * 10;
        // One group of 8: halved until no unit exceeds the fair share, 4 and 4.
        let s = balance(vec![(0..8).collect()], cost, 2);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.iter().map(|s| s.concat().len()).collect::<Vec<_>>(),
            [4, 4]
        );
        // Every prompt exactly once.
        let groups = vec![vec![0], vec![1, 2, 3], vec![4, 5], vec![6]];
        let s = balance(groups, cost, 2);
        let mut all: Vec<usize> = s.iter().flat_map(|s| s.concat()).collect();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        let loads: Vec<usize> = s.iter().map(|s| s.iter().map(|g| cost(g)).sum()).collect();
        assert!(
            loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 10,
            "{loads:?}"
        );
        // Fewer units than workers: no empty share.
        assert_eq!(balance(vec![vec![0]], cost, 4).len(), 1);
    }

    #[test]
    fn workers_run_each_share_on_a_one_thread_pool_in_order() -> Result<()> {
        let workers = Workers::new()?;
        let shares: Vec<Vec<usize>> = (0..5).map(|i| vec![i; i + 1]).collect();
        let out = workers.run(&shares, |s| {
            Ok((s.iter().sum::<usize>(), rayon::current_num_threads()))
        })?;
        assert_eq!(
            out.iter().map(|o| o.0).collect::<Vec<_>>(),
            [0, 2, 6, 12, 20]
        );
        assert!(out.iter().all(|o| o.1 == 1), "{out:?}");
        let err = workers.run(&shares, |s| {
            if s.len() == 3 {
                anyhow::bail!("share 3")
            } else {
                Ok(())
            }
        });
        assert!(err.is_err_and(|e| e.to_string() == "share 3"));
        Ok(())
    }
}
