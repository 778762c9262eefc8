//! Limits on client logins that Postgres enforces in the server and a proxy
//! that authenticates clients itself must enforce too: failed password
//! attempts per source address (a growing delay before the error, then a
//! lockout until the address has been quiet for a window), clients per user
//! and clients in total. One value is shared by every serving thread, so the
//! limits hold for the whole proxy, whichever thread the kernel hands a
//! connection to.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ProxyConfig;

/// How failed logins from one address are slowed down and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Delay before the error of the first recent failure; each further one
    /// doubles it (0: no delay).
    pub delay: Duration,
    pub max_delay: Duration,
    /// Recent failures after which the address is refused before
    /// authenticating (0: never).
    pub max_failures: u32,
    /// A failure stays recent until the address has had no failure for this long.
    pub window: Duration,
    /// Most addresses remembered at once.
    pub capacity: usize,
}

/// Whether an address may try to log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Too many recent failures; the lockout ends in `retry_after` unless
    /// the address fails again.
    LockedOut {
        retry_after: Duration,
    },
}

/// What a failure means for its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// How long to wait before telling the client.
    pub delay: Duration,
    /// Recent failures of the address, this one included.
    pub recent: u32,
    /// This failure locked the address out (logged once, not per refusal).
    pub locked_now: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

/// Recent failed logins per source address, with bounded memory: when
/// `capacity` addresses are tracked, the ones no longer recent go first, then
/// the one with the fewest failures (the quietest of those): an attacker
/// spraying addresses, one failure each, pushes out its own entries before
/// an address it has locked out.
#[derive(Debug)]
pub struct FailureLimiter {
    policy: FailurePolicy,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// The address failures are counted against: an IPv4 address (also when
/// IPv4-mapped), or an IPv6 /64 — one host usually holds a whole /64, so
/// counting its addresses one by one would not slow it down.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

impl FailureLimiter {
    pub fn new(policy: FailurePolicy) -> FailureLimiter {
        FailureLimiter {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn policy(&self) -> FailurePolicy {
        self.policy
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_recent(&self, entry: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(entry.last) < self.policy.window
    }

    /// Whether `ip` may try to authenticate now.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Admission {
        if self.policy.max_failures == 0 {
            return Admission::Allowed;
        }
        let entries = self.entries();
        match entries.get(&address_key(ip)) {
            Some(entry)
                if self.is_recent(entry, now) && entry.failures >= self.policy.max_failures =>
            {
                Admission::LockedOut {
                    retry_after: self
                        .policy
                        .window
                        .saturating_sub(now.saturating_duration_since(entry.last)),
                }
            }
            _ => Admission::Allowed,
        }
    }

    /// Counts a failed login of `ip`.
    pub fn record_failure(&self, ip: IpAddr, now: Instant) -> Failure {
        let key = address_key(ip);
        let mut entries = self.entries();
        if !entries.contains_key(&key) && entries.len() >= self.policy.capacity.max(1) {
            self.make_room(&mut entries, now);
        }
        let entry = entries.entry(key).or_insert(Entry {
            failures: 0,
            last: now,
        });
        if !self.is_recent(entry, now) {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last = now;
        let recent = entry.failures;
        let doublings = (recent - 1).min(31);
        let delay = self
            .policy
            .delay
            .saturating_mul(1u32 << doublings)
            .min(self.policy.max_delay.max(self.policy.delay));
        Failure {
            delay,
            recent,
            locked_now: self.policy.max_failures > 0 && recent == self.policy.max_failures,
        }
    }

    /// A successful login: the address starts over.
    pub fn record_success(&self, ip: IpAddr) {
        let key = address_key(ip);
        let mut entries = self.entries();
        entries.remove(&key);
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.entries().len()
    }

    fn make_room(&self, entries: &mut HashMap<IpAddr, Entry>, now: Instant) {
        entries.retain(|_, entry| self.is_recent(entry, now));
        while entries.len() >= self.policy.capacity.max(1) {
            let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, entry)| (entry.failures, entry.last))
                .map(|(key, _)| *key)
            else {
                return;
            };
            entries.remove(&oldest);
        }
    }
}

/// A client's place under the per-user limit, given back when dropped — also
/// when its session task panics or is aborted.
#[derive(Debug)]
pub struct UserSlot {
    /// `None` when no limit applies to the user (nothing is counted).
    counted: Option<(Arc<UserCounts>, String)>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Some((counts, user)) = self.counted.take() {
            counts.release(&user);
        }
    }
}

/// Connected clients per user that has a limit.
#[derive(Debug, Default)]
struct UserCounts {
    counts: Mutex<HashMap<String, usize>>,
}

impl UserCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, user: &str) {
        let mut counts = self.lock();
        if let Some(count) = counts.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Only users with clients stay: the map is bounded by the clients.
                counts.remove(user);
            }
        }
    }
}

/// Every login limit of the proxy, shared by its serving threads.
#[derive(Debug)]
pub struct LoginLimits {
    pub failures: FailureLimiter,
    /// `limits.max_clients`.
    clients: Arc<Semaphore>,
    /// `[[auth.users]] max_clients`, else `auth.max_clients_per_user`.
    per_user: HashMap<String, usize>,
    default_per_user: Option<usize>,
    user_counts: Arc<UserCounts>,
}

impl LoginLimits {
    pub fn new(config: &ProxyConfig) -> LoginLimits {
        let auth = &config.auth;
        LoginLimits {
            failures: FailureLimiter::new(FailurePolicy {
                delay: Duration::from_millis(auth.failure_delay_ms),
                max_delay: Duration::from_millis(auth.failure_delay_max_ms),
                max_failures: auth.max_failures,
                window: Duration::from_secs(auth.failure_window_s),
                capacity: auth.tracked_addresses,
            }),
            clients: Arc::new(Semaphore::new(config.limits.max_clients)),
            per_user: auth
                .users
                .iter()
                .filter_map(|u| Some((u.name.clone(), u.max_clients?)))
                .collect(),
            default_per_user: auth.max_clients_per_user,
            user_counts: Arc::default(),
        }
    }

    /// A place under `limits.max_clients`, held for the client's life.
    pub fn client_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.clients.clone().try_acquire_owned().ok()
    }

    /// A place under `user`'s limit; `None` when the user has its most clients.
    pub fn user_slot(&self, user: &str) -> Option<UserSlot> {
        let Some(limit) = self.per_user.get(user).copied().or(self.default_per_user) else {
            return Some(UserSlot { counted: None });
        };
        let mut counts = self.user_counts.lock();
        let count = counts.entry(user.to_string()).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                counts.remove(user);
            }
            return None;
        }
        *count += 1;
        Some(UserSlot {
            counted: Some((self.user_counts.clone(), user.to_string())),
        })
    }

    /// Clients of `user` counted against its limit now.
    pub fn user_clients(&self, user: &str) -> usize {
        self.user_counts.lock().get(user).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FailurePolicy {
        FailurePolicy {
            delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            max_failures: 5,
            window: Duration::from_secs(60),
            capacity: 3,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn the_delay_doubles_per_recent_failure_up_to_the_cap() {
        let limiter = FailureLimiter::new(policy());
        let t0 = Instant::now();
        let delays: Vec<u64> = (0..6)
            .map(|i| {
                let now = t0 + Duration::from_secs(i);
                limiter
                    .record_failure(ip("10.0.0.1"), now)
                    .delay
                    .as_millis() as u64
            })
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn an_address_is_locked_out_after_max_failures_until_it_is_quiet_for_a_window() {
        let limiter = FailureLimiter::new(policy());
        let t0 = Instant::now();
        let attacker = ip("10.0.0.1");
        for i in 0..4 {
            assert!(!limiter.record_failure(attacker, t0).locked_now, "{i}");
            assert_eq!(limiter.check(attacker, t0), Admission::Allowed);
        }
        assert!(limiter.record_failure(attacker, t0).locked_now);
        let later = t0 + Duration::from_secs(20);
        assert_eq!(
            limiter.check(attacker, later),
            Admission::LockedOut {
                retry_after: Duration::from_secs(40)
            }
        );
        assert_eq!(
            limiter.check(ip("10.0.0.2"), later),
            Admission::Allowed,
            "other addresses are not affected"
        );
        let quiet = t0 + Duration::from_secs(60);
        assert_eq!(limiter.check(attacker, quiet), Admission::Allowed);
        let again = limiter.record_failure(attacker, quiet);
        assert_eq!(
            (again.recent, again.delay),
            (1, Duration::from_millis(100)),
            "an address quiet for a window starts over"
        );
    }

    #[test]
    fn a_success_resets_the_address() {
        let limiter = FailureLimiter::new(policy());
        let now = Instant::now();
        let client = ip("10.0.0.1");
        for _ in 0..4 {
            limiter.record_failure(client, now);
        }
        limiter.record_success(client);
        assert_eq!(limiter.tracked(), 0);
        assert_eq!(limiter.record_failure(client, now).recent, 1);
    }

    #[test]
    fn no_lockout_and_no_delay_when_turned_off() {
        let limiter = FailureLimiter::new(FailurePolicy {
            delay: Duration::ZERO,
            max_failures: 0,
            ..policy()
        });
        let now = Instant::now();
        for _ in 0..100 {
            assert_eq!(
                limiter.record_failure(ip("10.0.0.1"), now).delay,
                Duration::ZERO
            );
        }
        assert_eq!(limiter.check(ip("10.0.0.1"), now), Admission::Allowed);
    }

    #[test]
    fn memory_stays_bounded_and_a_sprayer_cannot_flush_a_locked_out_address() {
        let limiter = FailureLimiter::new(policy());
        let t0 = Instant::now();
        let locked = ip("10.0.0.1");
        for _ in 0..5 {
            limiter.record_failure(locked, t0 + Duration::from_secs(30));
        }
        limiter.record_failure(ip("10.0.0.2"), t0);
        limiter.record_failure(ip("10.0.0.3"), t0 + Duration::from_secs(10));
        // Spraying new addresses: the tracked set never grows past capacity,
        // and entries with one failure go before the locked-out one.
        let now = t0 + Duration::from_secs(31);
        for i in 0..1000u32 {
            limiter.record_failure(IpAddr::V4((0x0b00_0000 + i).into()), now);
            assert!(limiter.tracked() <= 3);
        }
        assert!(matches!(
            limiter.check(locked, now),
            Admission::LockedOut { .. }
        ));
        // Entries past the window go before recent ones.
        let limiter = FailureLimiter::new(policy());
        for _ in 0..5 {
            limiter.record_failure(locked, t0 + Duration::from_secs(100));
        }
        limiter.record_failure(ip("10.0.0.2"), t0);
        limiter.record_failure(ip("10.0.0.3"), t0);
        let now = t0 + Duration::from_secs(101);
        limiter.record_failure(ip("10.0.0.4"), now);
        assert_eq!(limiter.tracked(), 2, "both stale entries were dropped");
        assert!(matches!(
            limiter.check(locked, now),
            Admission::LockedOut { .. }
        ));
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_ipv4_as_ipv4() {
        let limiter = FailureLimiter::new(policy());
        let now = Instant::now();
        for i in 0..5u32 {
            limiter.record_failure(ip(&format!("2001:db8:1:2::{i:x}")), now);
        }
        assert!(matches!(
            limiter.check(ip("2001:db8:1:2:ffff::1"), now),
            Admission::LockedOut { .. }
        ));
        assert_eq!(
            limiter.check(ip("2001:db8:1:3::1"), now),
            Admission::Allowed
        );
        assert_eq!(address_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn user_slots_are_limited_per_user_and_given_back_on_drop() {
        let mut config = ProxyConfig::default();
        config.auth.max_clients_per_user = Some(2);
        config.auth.users = vec![crate::config::UserEntry {
            name: "batch".into(),
            max_clients: Some(1),
            ..Default::default()
        }];
        let limits = LoginLimits::new(&config);
        let first = limits.user_slot("batch").expect("first batch client");
        assert!(limits.user_slot("batch").is_none(), "batch allows one");
        let app: Vec<_> = (0..2).filter_map(|_| limits.user_slot("app")).collect();
        assert_eq!(app.len(), 2);
        assert!(limits.user_slot("app").is_none(), "the default allows two");
        drop(first);
        assert_eq!(limits.user_clients("batch"), 0);
        assert!(
            limits.user_slot("batch").is_some(),
            "a freed slot is reused"
        );
        drop(app);
        assert_eq!(
            limits.user_counts.lock().len(),
            0,
            "no entry without clients"
        );
    }

    #[tokio::test]
    async fn a_slot_is_given_back_when_its_task_panics_or_is_aborted() {
        let mut config = ProxyConfig::default();
        config.auth.max_clients_per_user = Some(2);
        let limits = Arc::new(LoginLimits::new(&config));
        let slot = limits.user_slot("app").expect("slot");
        let panicking = tokio::spawn(async move {
            let _slot = slot;
            panic!("a session that crashes");
        });
        assert!(panicking.await.is_err());
        let slot = limits.user_slot("app").expect("slot");
        let hanging = tokio::spawn(async move {
            let _slot = slot;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert_eq!(limits.user_clients("app"), 1);
        hanging.abort();
        assert!(hanging.await.is_err());
        assert_eq!(limits.user_clients("app"), 0);
    }

    #[test]
    fn users_without_a_limit_are_not_counted() {
        let limits = LoginLimits::new(&ProxyConfig::default());
        let slots: Vec<_> = (0..100).filter_map(|_| limits.user_slot("app")).collect();
        assert_eq!(slots.len(), 100);
        assert_eq!(limits.user_clients("app"), 0);
    }
}
