//! Leader election with a `coordination.k8s.io/v1` Lease, so two replicas (for example during a
//! rollout) never reconcile at once.
//!
//! The protocol is client-go's: the holder renews `renewTime` well within `leaseDurationSeconds`;
//! anyone may take over a lease whose renew time plus duration has passed, or one nobody holds.
//! Every write carries the `resourceVersion` that was read, so of two contenders exactly one wins
//! (the other gets 409 Conflict and keeps waiting). On shutdown the holder clears
//! `holderIdentity` so the next replica takes over at once instead of waiting out the lease.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

/// Default Lease name in bobbin's namespace.
pub const LEASE_NAME: &str = "bobbin-controller";

/// What to do with the lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No lease yet: create it holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it over.
    TakeOver,
    /// Someone else holds it until about this time.
    Wait { holder: String, until: Timestamp },
}

/// Pure decision from the current lease.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp, default_duration: Duration) -> Step {
    let Some(lease) = lease else { return Step::Create };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    match holder {
        None => Step::TakeOver,
        Some(h) if h == me => Step::Renew,
        Some(holder) => {
            let duration = spec
                .lease_duration_seconds
                .filter(|s| *s > 0)
                .map(|s| SignedDuration::from_secs(i64::from(s)))
                .unwrap_or_else(|| {
                    SignedDuration::try_from(default_duration).unwrap_or(SignedDuration::ZERO)
                });
            let last = spec.renew_time.or(spec.acquire_time).map(|t| t.0).unwrap_or(Timestamp::UNIX_EPOCH);
            let until = last.checked_add(duration).unwrap_or(last);
            if until <= now { Step::TakeOver } else { Step::Wait { holder, until } }
        }
    }
}

/// One replica's side of the election.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    retry: Duration,
}

impl LeaderElector {
    /// `identity` must be unique per process (pod name plus something random).
    pub fn new(api: Api<Lease>, name: &str, identity: &str, lease_duration: Duration) -> Self {
        LeaderElector {
            api,
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            retry: lease_duration / 3,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: Option<i32>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        }
    }

    /// One attempt: `Ok(true)` when we hold the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        match decide(current.as_ref(), &self.identity, now, self.lease_duration) {
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(self.spec(now, None, Some(0))),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Step::Renew | Step::TakeOver => {
                let Some(mut lease) = current else { return Ok(false) };
                let old = lease.spec.clone().unwrap_or_default();
                let renewing = old.holder_identity.as_deref() == Some(self.identity.as_str());
                let spec = if renewing {
                    self.spec(now, old.acquire_time, old.lease_transitions)
                } else {
                    self.spec(now, None, Some(old.lease_transitions.unwrap_or(0) + 1))
                };
                lease.spec = Some(spec);
                match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Step::Wait { .. } => Ok(false),
        }
    }

    /// Wait until we lead. `false` when `shutdown` came first.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
                    return true;
                }
                Ok(false) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Err(e) => tracing::warn!(error = %e, lease = %self.name, "lease check failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(self.retry) => {}
            }
        }
    }

    /// Keep renewing until `stop`; cancel `lost` (and return) if the lease is taken or cannot be
    /// renewed before it would expire.
    pub async fn hold(&self, stop: CancellationToken, lost: CancellationToken) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.retry) => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "lost the lease to another replica");
                    lost.cancel();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Stop before the lease can expire under us (one retry period of margin).
                    if last_renewed.elapsed() + self.retry >= self.lease_duration {
                        tracing::error!(lease = %self.name, "could not renew the lease in time");
                        lost.cancel();
                        return;
                    }
                }
            }
        }
    }

    /// Give the lease up (if we still hold it) so another replica can lead at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::mock::{ApiServer, Exchange};

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/bobbin-test/leases";

    fn lease(holder: Option<&str>, renewed: &str, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.into()),
                namespace: Some("bobbin-test".into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(renewed.parse().expect("ts"))),
                acquire_time: Some(MicroTime(renewed.parse().expect("ts"))),
                lease_transitions: Some(3),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        let now: Timestamp = "2026-11-21T12:00:20Z".parse().expect("ts");
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "me", now, d), Step::Create);
        assert_eq!(decide(Some(&lease(Some("me"), "2026-11-21T12:00:19Z", "1")), "me", now, d), Step::Renew);
        assert_eq!(decide(Some(&lease(None, "2026-11-21T12:00:19Z", "1")), "me", now, d), Step::TakeOver);
        assert_eq!(
            decide(Some(&lease(Some("other"), "2026-11-21T12:00:10Z", "1")), "me", now, d),
            Step::Wait { holder: "other".into(), until: "2026-11-21T12:00:25Z".parse().expect("ts") }
        );
        assert_eq!(
            decide(Some(&lease(Some("other"), "2026-11-21T12:00:04Z", "1")), "me", now, d),
            Step::TakeOver
        );
    }

    #[tokio::test]
    async fn create_then_lose_a_race_then_take_over_an_expired_lease_and_release() {
        let ours = serde_json::to_value(lease(Some("me"), "2026-11-21T12:00:00Z", "9")).expect("json");
        let (client, server) = ApiServer::new(vec![
            // 1. No lease: create it.
            Exchange::get(&format!("{LEASES}/{LEASE_NAME}")).fail(404, "NotFound"),
            Exchange::post(&format!("{LEASES}?"))
                .body(serde_json::json!({"metadata": {"name": LEASE_NAME}, "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15, "leaseTransitions": 0}}))
                .respond(201, ours.clone()),
            // 2. Someone else's fresh lease: wait.
            Exchange::get(&format!("{LEASES}/{LEASE_NAME}"))
                .respond(200, serde_json::to_value(lease(Some("other"), "2999-01-01T00:00:00Z", "10")).expect("json")),
            // 3. An expired one: take over with the version read, counting the transition.
            Exchange::get(&format!("{LEASES}/{LEASE_NAME}"))
                .respond(200, serde_json::to_value(lease(Some("other"), "2020-01-01T00:00:00Z", "11")).expect("json")),
            Exchange::put(&format!("{LEASES}/{LEASE_NAME}?"))
                .body(serde_json::json!({"metadata": {"resourceVersion": "11"}, "spec": {"holderIdentity": "me", "leaseTransitions": 4}}))
                .respond(200, ours.clone()),
            // 4. Release: clear the holder.
            Exchange::get(&format!("{LEASES}/{LEASE_NAME}")).respond(200, ours.clone()),
            Exchange::put(&format!("{LEASES}/{LEASE_NAME}?"))
                .body(serde_json::json!({"metadata": {"resourceVersion": "9"}, "spec": {"leaseDurationSeconds": 1}}))
                .respond(200, ours),
        ]);
        let elector = LeaderElector::new(
            Api::namespaced(client, "bobbin-test"),
            LEASE_NAME,
            "me",
            Duration::from_secs(15),
        );
        assert!(elector.try_acquire_or_renew().await.expect("create"));
        assert!(!elector.try_acquire_or_renew().await.expect("wait"));
        assert!(elector.try_acquire_or_renew().await.expect("take over"));
        elector.release().await.expect("release");
        server.done().await;
    }

    #[tokio::test]
    async fn holding_renews_and_notices_a_lost_lease() {
        let ours = serde_json::to_value(lease(Some("me"), "2026-11-21T12:00:00Z", "9")).expect("json");
        let theirs = serde_json::to_value(lease(Some("other"), "2999-01-01T00:00:00Z", "12")).expect("json");
        let (client, server) = ApiServer::new(vec![
            // One renewal, keeping the acquire time and transition count...
            Exchange::get(&format!("{LEASES}/{LEASE_NAME}")).respond(200, ours.clone()),
            Exchange::put(&format!("{LEASES}/{LEASE_NAME}?"))
                .body(
                    serde_json::json!({"metadata": {"resourceVersion": "9"}, "spec": {"holderIdentity": "me",
                    "acquireTime": "2026-11-21T12:00:00.000000Z", "leaseTransitions": 3}}),
                )
                .respond(200, ours),
            // ...then another replica holds it: stop leading.
            Exchange::get(&format!("{LEASES}/{LEASE_NAME}")).respond(200, theirs),
        ]);
        let elector = LeaderElector::new(
            Api::namespaced(client, "bobbin-test"),
            LEASE_NAME,
            "me",
            Duration::from_millis(300),
        );
        let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
        tokio::time::timeout(Duration::from_secs(5), elector.hold(stop, lost.clone()))
            .await
            .expect("hold returns");
        assert!(lost.is_cancelled());
        server.done().await;
    }
}
