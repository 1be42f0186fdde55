"""``executor: ray``: each sampled client's round runs on a pool of Ray actors (client workers).

Where each part runs:

- the driver (the process that called ``fedsec run``): client sampling, every server-side
  hook (collusion, server_observation, aggregation, post_aggregation), the scorers
  (score_round, training_end), evaluation and MLflow logging;
- a client worker: the client-side hooks (client_data, local_training, client_update,
  transport) and local training, one client at a time.

What travels, and how often:

- once per run, to each worker: the scenario, the tokenizer and the tuned model with its
  frozen weights, so a worker trains exactly the driver's model (no checkpoint path or
  pretraining needed on the worker). Each worker builds the clients' data itself from the
  scenario and the client id: no client's data is shipped;
- once per round, one object in the object store: the global trainable state and the
  driver's client-side plugins as they stand at the round's start (pickled without their
  runtime; a worker binds them to its own). A worker reads it once per round, not per client;
  a client the server sent a crafted state (``dispatch``) gets that state as an object of its own;
- back, per client: its :class:`Message` and its :class:`~fedsec_bench.ground_truth.ClientReport`.
  Attributes a client-side hook sets on its plugin stay on the worker; what the client sends,
  and ``client.metrics`` and ``client.notes`` for the scorers, are the way back, as with ``local``.

Faults: a client whose task raises, or whose worker dies (Ray restarts the actor), is tried
once more on another worker; if that fails too the round goes on without it, a warning
says why, and ``fault.failed_clients`` counts it. If every sampled client of a round fails,
the run stops with the error: that is a bug to fix, not a fault to ride out.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from .client import client_round, client_seed
from .data import build_federated_data
from .executors import ClientResult
from .messages import ClientContext, Message, RoundContext, State
from .plugins import HookChain
from .runtime import Runtime, assemble_runtime, resolve_device
from .scenario import RayConfig, Scenario

ATTEMPTS = 2
"""Tries per client and round: the first, and one retry."""


@dataclass(frozen=True)
class ClientJob:
    client_id: int
    round: int
    seed: int
    peers: tuple[int, ...]
    peer_digests: tuple[tuple[int, str], ...] = ()
    crafted: list | None = None
    """A state the server sent this client instead of the global one (``dispatch``), wrapped in a list
    holding its object-store reference; None for the round's global state."""


@dataclass
class RoundBroadcast:
    """What every worker needs for a round, put in the object store once."""

    round: int
    global_state: State
    hooks: HookChain


@dataclass
class WorkerSetup:
    """What every worker needs for the whole run, put in the object store once."""

    scenario: Scenario
    tokenizer: object
    model: torch.nn.Module


class ClientWorker:
    """A Ray actor: runs clients' rounds on its own copy of the runtime (data built here)."""

    def __init__(self, setup_ref: list[ray.ObjectRef]):
        """``setup_ref`` is wrapped in a list: the executor keeps the reference alive, so a restarted
        actor (after its worker died) can read it again."""
        setup: WorkerSetup = ray.get(setup_ref[0])
        scenario = setup.scenario
        self.scratch = tempfile.TemporaryDirectory(prefix="fedsec-worker-")
        self.runtime = assemble_runtime(
            scenario, build_federated_data(scenario), resolve_device(scenario.device),
            setup.tokenizer, setup.model, Path(self.scratch.name),
        )
        self.round: int | None = None
        self.global_state: State = {}
        self.hooks = HookChain([])

    def train(self, broadcast: list[ray.ObjectRef], job: ClientJob) -> ClientResult:
        """``broadcast`` is wrapped in a list so that Ray hands over the reference, read once per round."""
        if job.round != self.round:
            shared: RoundBroadcast = ray.get(broadcast[0])
            self.global_state = {n: t.to(self.runtime.device) for n, t in shared.global_state.items()}
            self.hooks = shared.hooks.bind(self.runtime)
            self.round = job.round
        client = ClientContext(job.client_id, job.round, job.seed, self.runtime, peers=list(job.peers),
                               peer_digests=dict(job.peer_digests))
        state = self.global_state if job.crafted is None else _state_to(ray.get(job.crafted[0]), self.runtime.device)
        message, report = client_round(client, state, self.hooks)
        return _payload_to(message, torch.device("cpu")), report


class RayExecutor:
    def __init__(self, runtime: Runtime, hooks: HookChain):
        config = runtime.scenario.federation.ray
        self.started_ray = connect(config)
        self.device = runtime.device
        self.hooks = hooks.client_side()
        self.setup = ray.put(WorkerSetup(runtime.scenario, runtime.tokenizer, _on_cpu(runtime.model)))
        actor = ray.remote(ClientWorker).options(
            num_cpus=config.num_cpus_per_client, num_gpus=config.num_gpus_per_client, max_restarts=-1
        )
        count = config.max_concurrency or default_concurrency(config, runtime.scenario.federation.clients_per_round)
        self.workers = [actor.remote([self.setup]) for _ in range(count)]

    def run_clients(self, round: RoundContext) -> list[ClientResult]:
        broadcast = ray.put(RoundBroadcast(round.round, _state_to(round.global_state, "cpu"), self.hooks))
        peers = tuple(round.sampled)
        digests = tuple(round.received_digests().items()) if self.hooks.needs_peer_digests else ()
        crafted = {cid: [ray.put(_state_to(round.sent_to(cid), "cpu"))] for cid in round.sampled
                   if round.sent_to(cid) is not round.global_state}
        jobs = [ClientJob(cid, round.round, client_seed(round.runtime, round.round, cid), peers, digests, crafted.get(cid))
                for cid in round.sampled]
        done, failed = self.dispatch(jobs, broadcast)
        for cid, error in failed.items():
            warnings.warn(f"round {round.round}: client {cid} failed {ATTEMPTS} times and is left out of the "
                          f"round: {describe_error(error)}", stacklevel=2)
        if jobs and not done:
            raise RuntimeError(f"round {round.round}: every sampled client failed; the first error: "
                               f"{describe_error(next(iter(failed.values())))}")
        return [(_payload_to(done[cid][0], self.device), done[cid][1]) for cid in round.sampled if cid in done]

    def dispatch(self, jobs: list[ClientJob], broadcast) -> tuple[dict[int, ClientResult], dict[int, Exception]]:
        """Run the jobs on idle workers as they free up; a failed job is queued once more, then given up.

        Not ``ray.util.ActorPool``: its ``get_next_unordered`` raises a task's error without saying
        which job it was, and the retry needs exactly that (the job goes back in the queue).
        """
        queue = deque((job, 1) for job in jobs)
        idle = deque(self.workers)
        running: dict = {}
        done: dict[int, ClientResult] = {}
        failed: dict[int, Exception] = {}
        while queue or running:
            while queue and idle:
                job, attempt = queue.popleft()
                worker = idle.popleft()
                running[worker.train.remote([broadcast], job)] = (job, attempt, worker)
            [ref], _ = ray.wait(list(running), num_returns=1)
            job, attempt, worker = running.pop(ref)
            idle.append(worker)  # a dead actor is restarted by Ray; its next call waits for it
            try:
                done[job.client_id] = ray.get(ref)
            except ray.exceptions.RayError as error:
                if attempt < ATTEMPTS:
                    queue.append((job, attempt + 1))
                else:
                    failed[job.client_id] = error
        return done, failed

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self.started_ray:
            ray.shutdown()


def connect(config: RayConfig) -> bool:
    """Join the configured cluster, or start a local instance; True if this call did (so close() stops it).

    Inside a Ray task or with Ray already initialised (a sweep child, a notebook), the
    existing connection is used as it is.
    """
    if ray.is_initialized():
        return False
    ray.init(address=config.address, include_dashboard=False, logging_level="WARNING")
    return True


def default_concurrency(config: RayConfig, clients_per_round: int) -> int:
    """As many workers as the cluster's CPUs (and GPUs, if asked for) hold, at most one per sampled client."""
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) // config.num_cpus_per_client
    if config.num_gpus_per_client:
        fits = min(fits, resources.get("GPU", 0) // config.num_gpus_per_client)
    return int(max(1, min(fits, clients_per_round)))


def _on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """The model as workers receive it: on the CPU (a worker moves it to its own device)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).to("cpu")


def _state_to(state: State, device) -> State:
    return {name: t.to(device) for name, t in state.items()}


def _payload_to(message: Message | None, device: torch.device) -> Message | None:
    """Plain updates move between the worker's and the driver's device; other payloads are bytes or arrays."""
    if message is not None and message.is_plain:
        message.payload = _state_to(message.payload, device)
    return message


def describe_error(error: Exception) -> str:
    """One line for a failed Ray task: the exception it raised, or why its worker went away."""
    cause = getattr(error, "cause", None)
    return f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(error).__name__}: {error}".splitlines()[0]
