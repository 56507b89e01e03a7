//! Canary generations in the pinned state: a second slot that takes a share
//! of new connections beside the active one ([`Canary`] in `STATE_CANARY`).
//!
//! Every change is one map write under the instance lock, made by whoever
//! asks: the canary itself when it starts, `proxy canary/promote/abort`
//! from any PID namespace, the active generation when it judges the canary
//! (automatic abort, `promote_after`) or finds it dead. The generations
//! learn the outcome from the maps at their next tick: the canary becomes
//! active when the active slot names it, and soft-stops when no slot does.

use proxy_common::{BASIS_POINTS, Canary, GenRecord, Phase};

use super::{Locked, Maps, Result, Slot, SteeringError, is_alive};

/// The canary of an instance as the maps say, with its generation.
#[derive(Clone, Debug)]
pub struct LiveCanary {
    pub canary: Canary,
    pub record: GenRecord,
}

/// A share in percent (as operators type it) in basis points: 0..=100,
/// at most two decimals.
pub fn weight_from_percent(percent: f64) -> std::result::Result<u32, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!(
            "{percent} is not a share: expected a percentage from 0 to 100, e.g. 10 or 2.5"
        ));
    }
    Ok((percent * 100.0).round() as u32)
}

/// Basis points as a percentage, for logs and views.
pub fn percent(weight_bp: u32) -> f64 {
    f64::from(weight_bp) * 100.0 / f64::from(BASIS_POINTS)
}

impl Maps {
    /// The canary, when its generation is alive and still a canary (a
    /// canary entry left by a generation that died counts as none).
    pub fn live_canary(&self) -> Result<Option<LiveCanary>> {
        let Some(canary) = self.canary()? else {
            return Ok(None);
        };
        let record = self.record(Slot(canary.slot))?;
        Ok((is_alive(&record) && record.phase() == Some(Phase::Canary))
            .then_some(LiveCanary { canary, record }))
    }

    /// The live generation that holds the active slot.
    fn live_active(&self) -> Result<Option<(Slot, GenRecord)>> {
        let Some(slot) = self.active_slot()? else {
            return Ok(None);
        };
        let record = self.record(slot)?;
        Ok((is_alive(&record) && record.phase() == Some(Phase::Active)).then_some((slot, record)))
    }

    /// Why `slot` may not become a canary now, if it may not: there must be
    /// a live active generation to share with, and no other live canary.
    pub fn canary_refusal(&self, slot: Slot) -> Result<Option<SteeringError>> {
        if self.live_active()?.is_none() {
            return Ok(Some(SteeringError::NoActiveForCanary));
        }
        Ok(match self.live_canary()? {
            Some(c) if c.canary.slot != slot.0 => Some(SteeringError::CanaryExists {
                generation: c.record.generation,
                slot: c.canary.slot,
            }),
            _ => None,
        })
    }
}

impl Locked<'_> {
    /// Makes `slot` the canary with a share of `weight_bp`, unless refused
    /// (see [`Maps::canary_refusal`]).
    pub fn start_canary(&mut self, slot: Slot, weight_bp: u32) -> Result<()> {
        if let Some(refusal) = self.canary_refusal(slot)? {
            return Err(refusal);
        }
        self.set_canary(Some(Canary {
            slot: slot.0,
            weight_bp,
        }))
    }

    /// Changes the share of the live canary; returns it as it was.
    pub fn set_canary_weight(&mut self, weight_bp: u32) -> Result<LiveCanary> {
        let live = self.live_canary()?.ok_or(SteeringError::NoCanary)?;
        self.set_canary(Some(Canary {
            weight_bp,
            ..live.canary
        }))?;
        Ok(live)
    }

    /// The canary becomes the active generation: the active slot names it
    /// (the one write that moves the traffic), then the canary entry is
    /// cleared (the program ignores a canary that is the active slot, so
    /// the order leaves no gap). `only` makes it a compare-and-swap on the
    /// canary's slot.
    pub fn promote_canary(&mut self, only: Option<Slot>) -> Result<LiveCanary> {
        let live = self.live_canary()?.ok_or(SteeringError::NoCanary)?;
        if only.is_some_and(|s| s.0 != live.canary.slot) {
            return Err(SteeringError::NoCanary);
        }
        self.flip(Slot(live.canary.slot), None)?;
        self.set_canary(None)?;
        Ok(live)
    }

    /// Every new connection goes back to the active generation; the canary
    /// sees it and soft-stops. `only` as for [`Locked::promote_canary`].
    pub fn abort_canary(&mut self, only: Option<Slot>) -> Result<LiveCanary> {
        let live = self.live_canary()?.ok_or(SteeringError::NoCanary)?;
        if only.is_some_and(|s| s.0 != live.canary.slot) {
            return Err(SteeringError::NoCanary);
        }
        self.set_canary(None)?;
        Ok(live)
    }

    /// Clears the canary entry if it names `slot`, whatever the state of its
    /// generation (it left, died, or the slot is being reused).
    pub fn clear_canary_of(&mut self, slot: Slot) -> Result<bool> {
        if self.canary()?.is_some_and(|c| c.slot == slot.0) {
            self.set_canary(None)?;
            return Ok(true);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_shares_become_basis_points() {
        assert_eq!(weight_from_percent(10.0), Ok(1000));
        assert_eq!(weight_from_percent(2.5), Ok(250));
        assert_eq!(weight_from_percent(0.0), Ok(0));
        assert_eq!(weight_from_percent(100.0), Ok(BASIS_POINTS));
        for bad in [-1.0, 100.5, f64::NAN, f64::INFINITY] {
            let e = weight_from_percent(bad).unwrap_err();
            assert!(e.contains("percentage from 0 to 100"), "{e}");
        }
        assert_eq!(percent(250), 2.5);
    }
}
