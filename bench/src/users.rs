//! Which user a packet belongs to. PRANA sends one packet per active user
//! every 5 s, so consecutive packets come from different users: packet k
//! goes to user `k·s mod N` with the stride s coprime to N. Every user then
//! gets exactly one packet in each run of N, and neighbours in time land
//! far apart in the user index (as they do in production), which a plain
//! `k mod N` would not give.
use clap::Args;

#[derive(Args, Clone, Copy, Debug)]
pub struct UsersArg {
    /// Distinct user_ids the packets are spread over (scattered, one packet
    /// per user in each run of N)
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub users: u64,

    /// Random (v4) packet ids, as `crypto.randomUUID()` in a browser makes
    /// them, instead of time-ordered v7 ones
    #[arg(long)]
    pub random_ids: bool,
}

impl UsersArg {
    pub fn spread(self) -> UserSpread {
        UserSpread {
            random_ids: self.random_ids,
            ..UserSpread::new(self.users)
        }
    }
}

/// N users and the stride that scatters consecutive packets over them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserSpread {
    users: u64,
    stride: u64,
    /// The packets' ids are v4 (random), not v7.
    pub random_ids: bool,
}

impl UserSpread {
    pub fn new(users: u64) -> Self {
        let users = users.max(1);
        // Near N/φ: the multiples of such a stride spread evenly over the
        // ring (the golden-ratio sequence), so no two nearby packets share
        // an index neighbourhood. The first coprime one from there keeps
        // the map k ↦ k·s mod N a permutation of every run of N.
        let mut stride = ((users as f64 * 0.618_033_988_7) as u64).max(1);
        while gcd(stride, users) != 1 {
            stride += 1;
        }
        Self {
            users,
            stride,
            random_ids: false,
        }
    }

    pub fn users(self) -> u64 {
        self.users
    }

    /// The user (0..N) of the packet with this sequence number.
    pub fn user_of(self, seq: u64) -> u64 {
        // u128: seq·stride overflows u64 after ~10^15 packets at N = 10^4
        // — never in a run, but cheaper to rule out than to argue.
        ((u128::from(seq) * u128::from(self.stride)) % u128::from(self.users)) as u64
    }

    /// The user_id the packet with this sequence number carries.
    pub fn user_id(self, seq: u64) -> String {
        format!("user_{}", self.user_of(seq))
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_once_in_each_run_of_n() {
        for n in [1, 2, 7, 12, 1000, 10_000] {
            let spread = UserSpread::new(n);
            let mut seen = vec![false; n as usize];
            for k in n..2 * n {
                let u = spread.user_of(k);
                assert!(!seen[u as usize], "user {u} twice with N = {n}");
                seen[u as usize] = true;
            }
        }
    }

    #[test]
    fn consecutive_packets_hit_different_users() {
        let spread = UserSpread::new(10_000);
        for k in 0..20_000 {
            let (a, b) = (spread.user_of(k), spread.user_of(k + 1));
            // At least a tenth of the ring apart, either way round.
            let apart = a.abs_diff(b).min(10_000 - a.abs_diff(b));
            assert!(apart >= 1000, "packets {k} and {} → users {a}, {b}", k + 1);
        }
    }
}
