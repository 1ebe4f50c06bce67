//! Dispatch order: which runnable step goes first.
//!
//! The order is pluggable through [`StepOrder`]: it maps a read-only
//! [`StepView`] to a key, and the step with the *smallest* key is dispatched
//! first. The core computes a step's key when the step enters a runnable
//! queue and again whenever an input of the view changes (a build added,
//! bumped, cancelled or finished changes [`Priority`]); so a key must be a
//! pure function of the view. [`HydraOrder`] is Hydra's order: global
//! priority, then build priority, then the oldest build.
//! [`CriticalPathOrder`] puts the step with the longest critical path
//! first after the global priority (a bump still wins), so the longest
//! chains of work start early and the last builds finish sooner.
//! [`ConfiguredOrder`] is either, chosen at run time by name (`hydra`,
//! `critical-path`); [`crate::Core::new`] uses Hydra's.

use std::cmp::Reverse;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::types::{BuildId, DrvPath, Millis};

/// The priorities a step inherits from the builds that need it: the maximum
/// global and local priority and the lowest build id over every unfinished
/// build that depends on the step, directly or through other steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priority {
    /// `Builds.globalPriority` (raised by "bump"); higher goes first.
    pub global: i32,
    /// `Builds.priority` (`meta.schedulingPriority`); higher goes first.
    pub local: i32,
    /// The oldest build needing the step.
    pub lowest_build: BuildId,
}

impl Priority {
    /// The priority of a step no build needs: the neutral element of
    /// [`Priority::join`].
    pub const NONE: Priority = Priority {
        global: i32::MIN,
        local: i32::MIN,
        lowest_build: BuildId(i32::MAX),
    };

    /// The priority of a step needed by both `self`'s and `other`'s builds.
    pub fn join(self, other: Priority) -> Priority {
        Priority {
            global: self.global.max(other.global),
            local: self.local.max(other.local),
            lowest_build: self.lowest_build.min(other.lowest_build),
        }
    }
}

/// What an order may look at. Borrowed from the core for the duration of
/// one [`StepOrder::key`] call.
#[derive(Debug)]
pub struct StepView<'a> {
    pub drv_path: &'a DrvPath,
    pub system: &'a str,
    /// Sorted and deduplicated.
    pub required_features: &'a [Arc<str>],
    pub priority: Priority,
    /// When the step last became runnable.
    pub runnable_since: Millis,
    /// Failed attempts so far.
    pub tries: u32,
    /// How long the step is expected to take to build, in milliseconds.
    pub expected_ms: u32,
    /// The step's critical path: its expected time plus the longest
    /// expected time from it to the top of the builds that need it (the
    /// largest critical path among the steps that need it), in
    /// milliseconds, saturating.
    pub critical_path_ms: u32,
}

/// A dispatch order. The step with the smallest key goes first; ties go to
/// the step that became runnable first.
pub trait StepOrder {
    type Key: Ord + Clone;

    /// Must depend only on `step` (and on immutable state of `self`).
    fn key(&self, step: &StepView<'_>) -> Self::Key;
}

/// Hydra's order: higher global priority, then higher build priority, then
/// lower (older) build id.
#[derive(Clone, Copy, Debug, Default)]
pub struct HydraOrder;

/// The key of [`HydraOrder`]; field order is comparison order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HydraKey {
    global: Reverse<i32>,
    local: Reverse<i32>,
    lowest_build: BuildId,
}

impl StepOrder for HydraOrder {
    type Key = HydraKey;

    fn key(&self, step: &StepView<'_>) -> HydraKey {
        HydraKey {
            global: Reverse(step.priority.global),
            local: Reverse(step.priority.local),
            lowest_build: step.priority.lowest_build,
        }
    }
}

/// Critical path first: higher global priority (a bump still goes
/// first), then the longer critical path, then Hydra's order (higher build
/// priority, then the oldest build).
#[derive(Clone, Copy, Debug, Default)]
pub struct CriticalPathOrder;

/// The key of [`CriticalPathOrder`]; field order is comparison order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CriticalPathKey {
    global: Reverse<i32>,
    critical_path: Reverse<u32>,
    local: Reverse<i32>,
    lowest_build: BuildId,
}

impl StepOrder for CriticalPathOrder {
    type Key = CriticalPathKey;

    fn key(&self, step: &StepView<'_>) -> CriticalPathKey {
        CriticalPathKey {
            global: Reverse(step.priority.global),
            critical_path: Reverse(step.critical_path_ms),
            local: Reverse(step.priority.local),
            lowest_build: step.priority.lowest_build,
        }
    }
}

/// An order chosen at run time (a setting of the driver), by the names
/// [`FromStr`] and [`fmt::Display`] use: `hydra` or `critical-path`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConfiguredOrder {
    /// [`HydraOrder`].
    #[default]
    Hydra,
    /// [`CriticalPathOrder`].
    CriticalPath,
}

/// The key of [`ConfiguredOrder`]: that of the chosen order. One core only
/// ever compares keys of one variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConfiguredKey {
    Hydra(HydraKey),
    CriticalPath(CriticalPathKey),
}

impl ConfiguredOrder {
    /// Every order, by name.
    pub const ALL: [ConfiguredOrder; 2] = [ConfiguredOrder::Hydra, ConfiguredOrder::CriticalPath];

    pub fn name(self) -> &'static str {
        match self {
            ConfiguredOrder::Hydra => "hydra",
            ConfiguredOrder::CriticalPath => "critical-path",
        }
    }
}

impl StepOrder for ConfiguredOrder {
    type Key = ConfiguredKey;

    fn key(&self, step: &StepView<'_>) -> ConfiguredKey {
        match self {
            ConfiguredOrder::Hydra => ConfiguredKey::Hydra(HydraOrder.key(step)),
            ConfiguredOrder::CriticalPath => {
                ConfiguredKey::CriticalPath(CriticalPathOrder.key(step))
            }
        }
    }
}

impl fmt::Display for ConfiguredOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dispatch order name that is none of [`ConfiguredOrder::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown dispatch order `{0}` (known: hydra, critical-path)")]
pub struct UnknownOrder(pub String);

impl FromStr for ConfiguredOrder {
    type Err = UnknownOrder;

    fn from_str(name: &str) -> Result<Self, UnknownOrder> {
        ConfiguredOrder::ALL
            .into_iter()
            .find(|order| order.name() == name)
            .ok_or_else(|| UnknownOrder(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(drv: &DrvPath, global: i32, local: i32, build: i32) -> StepView<'_> {
        view_with_path(drv, global, 0, local, build)
    }

    fn view_with_path(
        drv: &DrvPath,
        global: i32,
        critical_path_ms: u32,
        local: i32,
        build: i32,
    ) -> StepView<'_> {
        StepView {
            drv_path: drv,
            system: "x86_64-linux",
            required_features: &[],
            priority: Priority {
                global,
                local,
                lowest_build: BuildId(build),
            },
            runnable_since: Millis::ZERO,
            tries: 0,
            expected_ms: 0,
            critical_path_ms,
        }
    }

    #[test]
    fn critical_path_order_compares_global_then_path_then_hydra() {
        let drv = DrvPath::from("/nix/store/x.drv");
        let key = |g, cp, l, b| CriticalPathOrder.key(&view_with_path(&drv, g, cp, l, b));
        assert!(
            key(1, 0, 0, 9) < key(0, 9_000, 0, 1),
            "global priority wins"
        );
        assert!(
            key(0, 9_000, 0, 9) < key(0, 100, 5, 1),
            "then the longer path"
        );
        assert!(key(0, 100, 5, 9) < key(0, 100, 4, 1), "then build priority");
        assert!(
            key(0, 100, 0, 1) < key(0, 100, 0, 2),
            "then the oldest build"
        );
    }

    #[test]
    fn configured_orders_are_named_and_key_like_the_order_they_name() {
        let drv = DrvPath::from("/nix/store/x.drv");
        let long = view_with_path(&drv, 0, 9_000, 0, 2);
        let short = view_with_path(&drv, 0, 100, 0, 1);
        let hydra: ConfiguredOrder = "hydra".parse().unwrap();
        let critical: ConfiguredOrder = "critical-path".parse().unwrap();
        assert_eq!(hydra, ConfiguredOrder::Hydra);
        assert_eq!(critical, ConfiguredOrder::CriticalPath);
        assert!(hydra.key(&short) < hydra.key(&long), "oldest build first");
        assert!(
            critical.key(&long) < critical.key(&short),
            "longest path first"
        );
        for order in ConfiguredOrder::ALL {
            assert_eq!(order.to_string().parse(), Ok(order));
        }
        assert_eq!(ConfiguredOrder::default(), ConfiguredOrder::Hydra);
        assert_eq!(
            "fifo".parse::<ConfiguredOrder>(),
            Err(UnknownOrder("fifo".to_string()))
        );
    }

    #[test]
    fn hydra_order_compares_global_then_local_then_oldest_build() {
        let drv = DrvPath::from("/nix/store/x.drv");
        let key = |g, l, b| HydraOrder.key(&view(&drv, g, l, b));
        assert!(key(1, 0, 9) < key(0, 100, 1), "global priority wins");
        assert!(key(0, 5, 9) < key(0, 4, 1), "then build priority");
        assert!(key(0, 0, 1) < key(0, 0, 2), "then the oldest build");
    }

    #[test]
    fn join_takes_the_most_urgent_of_each_component() {
        let a = Priority {
            global: 1,
            local: 0,
            lowest_build: BuildId(7),
        };
        let b = Priority {
            global: 0,
            local: 3,
            lowest_build: BuildId(2),
        };
        assert_eq!(
            a.join(b),
            Priority {
                global: 1,
                local: 3,
                lowest_build: BuildId(2)
            }
        );
        assert_eq!(a.join(Priority::NONE), a);
    }
}
