"""The pieces every user-level DP mechanism on FedAvg shares (``dp_fedavg``, ``dp_ftrl``).

Both release a noisy *sum* of per-user clipped updates over a fixed denominator, through the
ordinary FedAvg round loop; they differ only in the noise they add to the sum and in how
they account for it. The shared part:

1. each user's update Δ_k is clipped to L2 norm S on the client, so that one user moves the
   sum by at most S (the sensitivity both accountants assume): :func:`clip_update`, which also
   records 1[‖Δ_k‖ ≤ S] in ``client.metrics`` for the clipped-fraction figure;
2. every message is sent with ``num_examples = 1`` (:func:`equal_weights`): users weigh the
   same, and the server learns no dataset size;
3. so FedAvg's example-weighted mean is the plain mean of the n delivered updates, and the
   server gets the clipped sum back as mean · n (:func:`clipped_sum`). This relies on the
   aggregation computing the weighted mean of ``Message.num_examples`` and on seeing the
   plain update: :class:`UserLevelDP` declares ``needs_mean_aggregate`` and
   ``needs_model_from_aggregate_only``, and the plan refuses another rule or a hiding
   transport listed before it;
4. the noisy sum is divided by n̄, the fixed expected number of participants
   (:func:`over_expected_clients`): a denominator that depended on who showed up would
   depend on the data.

Scored outside the protocol: :func:`clipped_fraction`, the share of the delivered updates the
clip shortened (high: S cuts the signal; near 0: S is loose and the noise larger than it
needs to be), and the guarantee's default δ = 1/(2N) (:func:`user_delta`).
"""

from __future__ import annotations

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext, State
from fedsec_bench.plugins import Plugin
from fedsec_bench.updates import clip_to_norm


class UserLevelDP(Plugin):
    """Base of a user-level DP mechanism on FedAvg: equal-weight messages, and the declarations the plan
    checks that step 3 relies on (FedAvg's mean, computed from the plain updates)."""

    kind = "defense"
    on_instruction_data = "acts on the update only (the privacy unit is a client, all its pairs); the same on every data format"
    needs_mean_aggregate = True  # post_aggregation turns the mean of equal weights back into the sum
    needs_model_from_aggregate_only = True

    def transport(self, client: ClientContext, message: Message) -> Message:
        return equal_weights(message)


def clip_update(client: ClientContext, update: State, clip_norm: float, unclipped_key: str) -> State:
    """Δ · min(1, S/‖Δ‖) over all exchanged parameters at once; records 1[‖Δ‖ ≤ S] under ``unclipped_key``
    in ``client.metrics`` (simulator-side, for :func:`clipped_fraction`)."""
    clipped, norm = clip_to_norm(update, clip_norm)
    client.metrics[unclipped_key] = float(norm <= clip_norm)
    return clipped


def equal_weights(message: Message) -> Message:
    """Equal user weights: the server learns no dataset size and FedAvg's mean is unweighted."""
    message.num_examples = 1
    return message


def clipped_sum(aggregate: State, round: RoundContext) -> State:
    """Σ_k clip(Δ_k) from FedAvg's mean of equal weights: the mean times the updates in it (the sampled
    clients whose message arrived)."""
    participants = len(round.delivered)
    return {name: t * participants for name, t in aggregate.items()}


def over_expected_clients(total: State, expected_clients: float) -> State:
    """The released (noisy) sum over n̄, the fixed expected number of participants, not over whoever came."""
    return {name: t * (1.0 / expected_clients) for name, t in total.items()}


def clipped_fraction(round: RoundContext, truth: RoundTruth, unclipped_key: str) -> float:
    """The share of the round's delivered updates that the clip shortened (0 if none was delivered)."""
    unclipped = truth.client_values(unclipped_key, among=round.delivered)
    return 1 - sum(unclipped.values()) / len(unclipped) if unclipped else 0.0


def user_delta(delta: float | None, num_clients: int) -> float:
    """δ of the user-level guarantee: the option, else 1/(2N). Below 1/N, because publishing each user's data
    outright with probability δ is (0, δ)-DP: with δ ≥ 1/N that would be expected to publish a user."""
    return delta or 1.0 / (2 * num_clients)
