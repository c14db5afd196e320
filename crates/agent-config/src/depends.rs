//! Cycle detection for `depends_on` between manifest project entries. Pure: entries are
//! indices, each with the indices it depends on.

/// A dependency cycle among `edges` (entry `i` depends on each of `edges[i]`), as the entries
/// on it in dependency order, starting at the lowest index so that the same file always
/// names the same cycle; `None` when there is none. Out-of-range indices are ignored.
pub(crate) fn find_cycle(edges: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; edges.len()];
    for start in 0..edges.len() {
        if mark[start] != Mark::New {
            continue;
        }
        // Depth-first without recursion (a config may list many entries): the path from
        // `start` and, for each entry on it, how many of its edges were followed.
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            let Some(&to) = edges[node].get(*next) else {
                mark[node] = Mark::Done;
                path.pop();
                continue;
            };
            *next += 1;
            match mark.get(to) {
                Some(Mark::New) => {
                    mark[to] = Mark::OnPath;
                    path.push((to, 0));
                }
                Some(Mark::OnPath) => {
                    let from = path.iter().position(|&(n, _)| n == to)?;
                    let mut cycle: Vec<usize> = path[from..].iter().map(|&(n, _)| n).collect();
                    let lowest = (0..cycle.len()).min_by_key(|&k| cycle[k])?;
                    cycle.rotate_left(lowest);
                    return Some(cycle);
                }
                Some(Mark::Done) | None => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_and_diamonds_have_no_cycle() {
        assert_eq!(find_cycle(&[]), None);
        assert_eq!(find_cycle(&[vec![], vec![0], vec![1]]), None);
        // 3 depends on 1 and 2, both on 0.
        assert_eq!(find_cycle(&[vec![], vec![0], vec![0], vec![1, 2]]), None);
    }

    #[test]
    fn a_cycle_is_named_from_its_lowest_entry_in_dependency_order() {
        // 0 -> 1 -> 2 -> 0
        assert_eq!(
            find_cycle(&[vec![1], vec![2], vec![0]]),
            Some(vec![0, 1, 2])
        );
        // Found from 1 first (0 leads into it), still named from its lowest entry: 1 -> 3 -> 2 -> 1.
        assert_eq!(
            find_cycle(&[vec![1], vec![3], vec![1], vec![2]]),
            Some(vec![1, 3, 2])
        );
        assert_eq!(find_cycle(&[vec![], vec![1]]), Some(vec![1]), "itself");
    }

    #[test]
    fn out_of_range_edges_are_ignored() {
        assert_eq!(find_cycle(&[vec![7]]), None);
    }
}
