"""A media plane and messaging simulator that speaks the bus contract (SPEC section 7)."""

from switchboard.simulate.runner import SimulationPlan, Simulator

__all__ = ["SimulationPlan", "Simulator"]
