"""`fit_stage` starts a fit again only when Ray cancelled Train's controller before it ever ran."""

from __future__ import annotations

from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import ActorDiedError

from pipeline.train.ray_worker import controller_never_ran


def _died(never_started: bool) -> ActorDiedError:
    return ActorDiedError(ActorDiedErrorContext(class_name="TrainController", actor_id=bytes(16),
                                                error_message="all references to the actor were removed",
                                                never_started=never_started))


def test_only_a_controller_that_never_ran_is_started_again() -> None:
    assert controller_never_ran(_died(never_started=True))
    assert not controller_never_ran(_died(never_started=False))  # it ran: work may be lost, raise
    assert not controller_never_ran(RuntimeError("The actor never ran"))  # not Ray's error
