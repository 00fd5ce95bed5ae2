//! Placement decisions, kept pure so they can be tested alone: access
//! scores (decayed frequency or recency) and the plan of promotions and
//! demotions that fills a budget with the hottest objects, with hysteresis.

use crate::config::PlacementPolicy;

/// Access history of one object.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AccessStats {
    score: f64,
    last: u64,
}

impl AccessStats {
    /// Records an access at logical time `now` (a global access counter).
    pub fn touch(&mut self, now: u64, policy: PlacementPolicy, half_life: u32) {
        self.score = match policy {
            PlacementPolicy::AccessFrequency => self.score_at(now, policy, half_life) + 1.0,
            PlacementPolicy::Recency => 1.0,
        };
        self.last = now;
    }

    /// The score at `now`: the stored score halved every `half_life`
    /// accesses since the last one.
    pub fn score_at(&self, now: u64, _policy: PlacementPolicy, half_life: u32) -> f64 {
        let elapsed = now.saturating_sub(self.last) as f64;
        self.score * 0.5f64.powf(elapsed / f64::from(half_life.max(1)))
    }
}

/// One object as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The object.
    pub id: u64,
    /// Its size.
    pub bytes: u64,
    /// Its current score.
    pub score: f64,
    /// Whether it is resident in the fast tier now.
    pub resident: bool,
}

/// Moves the planner asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Objects to copy up into the fast tier.
    pub promote: Vec<u64>,
    /// Objects to drop from the fast tier (their slower copy stays).
    pub demote: Vec<u64>,
}

/// Plans the fast tier's content under `budget` bytes.
///
/// - Over budget (the budget shrank): the coldest residents go first.
/// - An object moves up only when its hotness (score over the hottest
///   score) is at least `threshold`.
/// - It takes free space first; it displaces residents only when each of
///   them is at most `threshold` times as hot as it is. Equal or similar
///   scores therefore never swap places (hysteresis), so a steady access
///   pattern converges and stays put.
pub fn plan(candidates: &[Candidate], budget: u64, threshold: f64) -> Plan {
    let mut plan = Plan::default();
    let hottest = candidates.iter().map(|c| c.score).fold(0.0, f64::max);
    let mut residents: Vec<&Candidate> = candidates.iter().filter(|c| c.resident).collect();
    // Coldest first: the eviction order.
    residents.sort_by(|a, b| a.score.total_cmp(&b.score).then(b.id.cmp(&a.id)));
    let mut used: u64 = residents.iter().map(|c| c.bytes).sum();
    let mut next_victim = 0;
    while used > budget && next_victim < residents.len() {
        used -= residents[next_victim].bytes;
        plan.demote.push(residents[next_victim].id);
        next_victim += 1;
    }
    if hottest <= 0.0 {
        return plan;
    }
    let mut waiting: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| !c.resident && c.score / hottest >= threshold && c.bytes <= budget)
        .collect();
    // Hottest first; lower ids first on ties so the plan is deterministic.
    waiting.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    for cand in waiting {
        if used + cand.bytes <= budget {
            used += cand.bytes;
            plan.promote.push(cand.id);
            continue;
        }
        // Victims needed, coldest first, each cold enough to be displaced.
        let mut freed = 0;
        let mut take = next_victim;
        while used - freed + cand.bytes > budget
            && take < residents.len()
            && residents[take].score <= threshold * cand.score
        {
            freed += residents[take].bytes;
            take += 1;
        }
        if used - freed + cand.bytes <= budget {
            for victim in &residents[next_victim..take] {
                plan.demote.push(victim.id);
            }
            next_victim = take;
            used = used - freed + cand.bytes;
            plan.promote.push(cand.id);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, bytes: u64, score: f64, resident: bool) -> Candidate {
        Candidate {
            id,
            bytes,
            score,
            resident,
        }
    }

    #[test]
    fn fills_free_space_with_the_hottest() {
        let p = plan(
            &[
                c(1, 10, 5.0, false),
                c(2, 10, 9.0, false),
                c(3, 10, 8.0, false),
            ],
            20,
            0.7,
        );
        assert_eq!(p.promote, [2, 3]);
        assert!(p.demote.is_empty());
    }

    #[test]
    fn similar_scores_do_not_swap_places() {
        // 1 is resident, 2 is a bit hotter: within the hysteresis band.
        let p = plan(&[c(1, 10, 8.0, true), c(2, 10, 10.0, false)], 10, 0.7);
        assert_eq!(p, Plan::default());
        // Much hotter: 1 is at most 0.7 times as hot, so it is displaced.
        let p = plan(&[c(1, 10, 6.0, true), c(2, 10, 10.0, false)], 10, 0.7);
        assert_eq!(p.promote, [2]);
        assert_eq!(p.demote, [1]);
    }

    #[test]
    fn cold_objects_stay_down_even_with_room() {
        let p = plan(&[c(1, 10, 10.0, true), c(2, 10, 5.0, false)], 100, 0.7);
        assert!(p.promote.is_empty(), "hotness 0.5 is under the threshold");
    }

    #[test]
    fn shrinking_budget_demotes_the_coldest() {
        let p = plan(
            &[
                c(1, 10, 3.0, true),
                c(2, 10, 1.0, true),
                c(3, 10, 2.0, true),
            ],
            15,
            0.7,
        );
        assert_eq!(p.demote, [2, 3]);
    }

    #[test]
    fn decay_halves_per_half_life_and_recency_resets() {
        let mut a = AccessStats::default();
        let f = PlacementPolicy::AccessFrequency;
        a.touch(0, f, 10);
        a.touch(0, f, 10);
        assert_eq!(a.score_at(0, f, 10), 2.0);
        assert!((a.score_at(10, f, 10) - 1.0).abs() < 1e-12);
        let mut r = AccessStats::default();
        r.touch(5, PlacementPolicy::Recency, 10);
        r.touch(6, PlacementPolicy::Recency, 10);
        assert_eq!(r.score_at(6, PlacementPolicy::Recency, 10), 1.0);
    }

    #[test]
    fn a_steady_pattern_converges() {
        // Repeated planning on the outcome of the last plan makes no more moves.
        let mut objs: Vec<Candidate> = (0..8).map(|i| c(i, 10, 4.0, false)).collect();
        for round in 0..3 {
            let p = plan(&objs, 35, 0.7);
            for o in &mut objs {
                if p.promote.contains(&o.id) {
                    o.resident = true;
                }
                if p.demote.contains(&o.id) {
                    o.resident = false;
                }
            }
            if round > 0 {
                assert_eq!(p, Plan::default());
            }
        }
        assert_eq!(objs.iter().filter(|o| o.resident).count(), 3);
    }
}
