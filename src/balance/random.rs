//! `random`: a uniformly random eligible endpoint.

use super::{first_usable, random_below, Candidates};

#[derive(Debug, Default)]
pub struct Random {
    members: Box<[u32]>,
}

/// Random draws before walking the list: with at most half of the
/// endpoints ejected, four misses in a row happen 1 time in 16.
const DRAWS: usize = 4;

impl Random {
    pub fn build(members: &[u32]) -> Self {
        Random {
            members: members.into(),
        }
    }

    #[inline]
    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        for _ in 0..DRAWS {
            let i = self.members[random_below(n)] as usize;
            if c.usable(i) {
                return Some(i);
            }
        }
        first_usable(&self.members, random_below(n), c)
    }
}
