"""The 3-stage pipeline on Ray: starts the stage actors and their torch.distributed group, feeds them
segments of several streams, gathers per-segment results, snapshots stream states and recovers from a
dead stage.

    with Pipeline("default", PipelineOptions(max_in_flight=4)) as pipe:
        for result in pipe.run(streams):
            ...
        states = pipe.final_states()

Control (which stream, segment, position) goes over Ray calls; activations go stage to stage over
torch.distributed (see stages.py / transport.py). Every wait has a timeout."""
from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator


from titans_runtime.config import TitansConfig, load_config
from titans_runtime.errors import InputError, PlanError, TitansError
from titans_runtime.model.state import StreamState
from titans_runtime.model.titans import DTYPES, TitanModel
from titans_runtime.runtime.checkpoint import Snapshot, SnapshotStore
from titans_runtime.runtime.scheduler import Scheduler, SegmentSource, Work
from titans_runtime.runtime.stages import STAGE_CLASSES, component_weights
from titans_runtime.runtime.transport import TransportError

log = logging.getLogger(__name__)

STAGES = ("core", "long_term_memory", "persistent_memory")
_POLL_S = 1.0  # how often the driver wakes up to look for stalls while waiting for results


@dataclass
class PipelineOptions:
    segment_len: int = 256            # tokens per segment (used for the memory plan; streams cut segments)
    max_in_flight: int = 4            # segments (of different streams) in flight at once
    checkpoint_every: int = 0         # snapshot each stream every N segments; 0 = off (no recovery)
    work_dir: str | None = None       # snapshots go here; None = runs/<timestamp>
    memory_off: bool = False          # ablation: long-term memory reset at every segment
    task_id: int = 0                  # persistent-memory bank
    address: str | None = None        # None = start a local Ray on 127.0.0.1; "auto" / "HOST:PORT" = connect
    use_gpu: bool | None = None       # None = use GPUs when the Ray cluster has some
    nccl_p2p_disable: bool = False    # NCCL_P2P_DISABLE=1 (consumer PCIe boxes without working P2P)
    timeout_s: float = 120.0          # every blocking wait (tensor messages, Ray calls, actor start)
    threads_per_stage: int = 1        # torch threads in each stage actor
    dtype: str | None = None          # override the model's dtype
    hardware: str | None = None       # hardware budget YAML for the memory plan (None = planner default)
    check_plan: bool = True           # refuse to start when the memory plan does not fit
    max_restarts: int = 3             # recoveries allowed in one run
    include_dashboard: bool | None = None  # for a local Ray; None = Ray's default

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InputError(f"pipeline option {name} must be positive, got {value!r}")

        for name in ("segment_len", "max_in_flight", "timeout_s", "threads_per_stage"):
            positive(name)
        if self.checkpoint_every < 0:
            raise InputError(f"pipeline option checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")


@dataclass
class SegmentResult:
    stream: str
    seq_no: int
    token_start: int
    token_end: int
    loss: float                       # nats per predicted token (nan when the segment predicts nothing)
    bits_per_token: float
    surprise: list[float]             # per memory layer, mean over the segment's tokens
    knowledge_attention: float        # mean attention mass on the persistent tokens
    stage_ms: dict[str, float]        # busy milliseconds per stage for this segment
    n_predicted: int                  # positions whose next token exists

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StageFailure(TitansError):
    """A stage died or a segment failed; carries what was running."""

    def __init__(self, message: str, stage: str | None, died: bool = False):
        super().__init__(message)
        self.stage = stage
        self.died = died


@dataclass
class _InFlight:
    work: Work
    refs: dict[str, Any]  # stage -> ObjectRef of its process() call
    snapshot: tuple[str, str] | None
    submitted: float = field(default_factory=time.perf_counter)


class Pipeline:
    def __init__(self, model: TitanModel | str, options: PipelineOptions | None = None):
        self.opts = options or PipelineOptions()
        self.opts.validate()
        self.config, self._model_dir, self._weights = self._resolve_model(model)
        if self.opts.dtype is not None:
            self.config = self.config.replace(dtype=self.opts.dtype)
        n_tasks = self.config.persistent.n_tasks
        if not 0 <= self.opts.task_id < n_tasks:
            raise InputError(f"unknown task id {self.opts.task_id} (this model has task ids 0..{n_tasks - 1})")
        self.work_dir = Path(self.opts.work_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        self.plan = self._check_plan()
        self._uid = uuid.uuid4().hex[:6]
        self._owns_ray = False
        self._actors: dict[str, Any] = {}
        self._pg = None
        self._weight_refs: dict[str, Any] = {}
        self._pending: dict[int, _InFlight] = {}
        self._final: dict[str, StreamState] = {}
        self._next_stream_index = 0
        self._ray = None
        self.restarts = 0
        # One entry per recovery: the error, the stage blamed, and per stream the seq_no of the snapshot it
        # resumed after (None: replayed from its start).
        self.recoveries: list[dict[str, Any]] = []
        self.backend = None
        self.placement = None

    # --------------------------------------------------------------------------------- model / plan
    @staticmethod
    def _resolve_model(model: TitanModel | str) -> tuple[TitansConfig, str | None, dict | None]:
        if isinstance(model, TitanModel):
            return model.config, None, model.state_dict()
        from titans_runtime.model.checkpoint import CONFIG_FILE, DEFAULT_MODEL_DIR, WEIGHTS_FILE

        directory = DEFAULT_MODEL_DIR if str(model) == "default" else Path(model)
        if not directory.is_dir():
            raise InputError(f"model folder not found: {directory}")
        if not (directory / WEIGHTS_FILE).is_file():
            raise InputError(f"{directory}: no {WEIGHTS_FILE} (expected a titans model folder)")
        return load_config(directory / CONFIG_FILE), str(directory.resolve()), None

    def _check_plan(self):
        if not self.opts.check_plan:
            return None
        try:
            from titans_runtime.planner import load_hardware, plan_memory
        except ImportError:  # the planner is optional for the runtime
            return None
        self.hardware = load_hardware(self.opts.hardware)
        plan = plan_memory(self.config, self.hardware, streams=self.opts.max_in_flight,
                           segment_len=self.opts.segment_len, dtype=self.config.dtype)
        if not plan.fits:
            raise PlanError(plan.describe())
        return plan

    # ------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Pipeline":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self._init_ray()
        try:
            self._start_stages()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._stop_stages()
        if self._owns_ray and self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False
        self._ray = None

    def _init_ray(self) -> None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray

        self._ray = ray
        if ray.is_initialized():
            return
        if self.opts.address:
            try:
                ray.init(address=self.opts.address, log_to_driver=False, logging_level=logging.WARNING)
            except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError / RuntimeError / ValueError
                raise TitansError(f"no Ray cluster reachable at {self.opts.address}: {str(e).splitlines()[0]}") from None
        else:
            # Unix socket paths are limited to 107 characters: keep Ray's temp dir short.
            ray.init(address="local", _node_ip_address="127.0.0.1", _temp_dir=f"/tmp/titans-{os.getpid()}",
                     include_dashboard=self.opts.include_dashboard, log_to_driver=False,
                     logging_level=logging.WARNING)
        self._owns_ray = True

    def _placement(self) -> tuple[str, float]:
        """('gpu' | 'shared-gpu' | 'cpu', num_gpus per stage)."""
        gpus = self._ray.cluster_resources().get("GPU", 0)
        use_gpu = self.opts.use_gpu if self.opts.use_gpu is not None else gpus >= 1
        if not use_gpu:
            return "cpu", 0.0
        if gpus >= 3:
            return "gpu", 1.0
        if gpus >= 1:  # NCCL cannot put two ranks on one GPU: share it, move tensors through host memory
            return "shared-gpu", 0.33
        raise TitansError("use_gpu is set but the Ray cluster has no GPU")

    def _start_stages(self) -> None:
        ray = self._ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.placement, num_gpus = self._placement()
        if self.placement == "gpu":
            from ray.util.placement_group import placement_group

            self._pg = placement_group([{"GPU": 1}] * 3, strategy="PACK", name=f"titans-{self._uid}")
            ready, _ = ray.wait([self._pg.ready()], timeout=self.opts.timeout_s)
            if not ready:
                raise TitansError("the Ray cluster cannot place 3 stages with one GPU each "
                                  f"(cluster has {ray.cluster_resources().get('GPU', 0)} GPUs)")
        env = {"NCCL_P2P_DISABLE": "1"} if self.opts.nccl_p2p_disable else {}
        for i, stage in enumerate(STAGES):
            if stage not in self._weight_refs:
                self._weight_refs[stage] = (ray.put(component_weights(self._weights, stage))
                                            if self._weights is not None else None)
            options: dict[str, Any] = dict(
                name=f"titans-{stage}-{self._uid}-{self.restarts}", num_cpus=0, num_gpus=num_gpus,
                max_concurrency=self.opts.max_in_flight + 4, max_restarts=0,
            )
            if env:
                options["runtime_env"] = {"env_vars": env}
            if self._pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=i)
            budget = self._budget_bytes(stage) if num_gpus else None
            actor_cls = ray.remote(STAGE_CLASSES[stage])
            self._actors[stage] = actor_cls.options(**options).remote(
                self.config.to_dict(), self._weight_refs[stage], self._model_dir, self.opts.threads_per_stage, budget)
        infos = self._call_all("info", startup=True)
        # NCCL when every stage drives its own GPU; gloo otherwise (host memory between shared or no GPUs).
        devices = [info["device"] for info in infos.values()]
        own_gpus = self.placement == "gpu" and all(d.startswith("cuda") for d in devices)
        self.backend = "nccl" if own_gpus else "gloo"
        self.stage_devices = {stage: info["device"] for stage, info in infos.items()}
        loopback = len({info["node_id"] for info in infos.values()}) == 1
        host = "127.0.0.1" if loopback else infos["core"]["ip"]
        port = self._get(self._actors["core"].free_port.remote(host), "core", "pick a port")
        slots = self.opts.max_in_flight
        self._call_all("connect", host, port, slots, self.backend, self.opts.timeout_s, loopback)
        task = self.opts.task_id
        refs = {"core": self._actors["core"].fetch_bank.remote(task),
                "persistent_memory": self._actors["persistent_memory"].send_bank.remote(task)}
        for stage, ref in refs.items():
            self._get(ref, stage, "exchange the persistent bank")
        self._free_slots = list(range(slots))
        self._pending = {}
        self._started = time.perf_counter()

    def _budget_bytes(self, stage: str) -> int | None:
        return None if self.plan is None else int(self.hardware.stage_budget_bytes(stage))

    def stage_actor(self, stage: str) -> Any:
        """The Ray actor handle of a stage ("core", "long_term_memory", "persistent_memory")."""
        return self._actors[stage]

    def _stop_stages(self) -> None:
        ray = self._ray
        if ray is None or not ray.is_initialized():
            self._actors = {}
            return
        for actor in self._actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self._actors = {}
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None
        self._pending = {}

    # ----------------------------------------------------------------------------------- Ray calls
    def _get(self, ref: Any, stage: str, what: str, timeout: float | None = None) -> Any:
        """ray.get with a timeout; failures become StageFailure naming the stage (or a user error)."""
        ray = self._ray
        try:
            return ray.get(ref, timeout=timeout if timeout is not None else self.opts.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise StageFailure(f"stage {stage} did not answer within {self.opts.timeout_s:.0f} s ({what})", stage) from None
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            if isinstance(cause, TitansError) and not isinstance(cause, TransportError):
                raise cause from None  # the user's input, not a crash: no retry
            raise StageFailure(f"stage {stage} failed to {what}: {_one_line(cause)}", stage) from None
        except ray.exceptions.RayActorError as e:
            raise StageFailure(f"stage {stage} died ({what}): {_one_line(e)}", stage, died=True) from None

    def _call_all(self, method: str, *args: Any, startup: bool = False) -> dict[str, Any]:
        refs = {stage: getattr(actor, method).remote(*args) for stage, actor in self._actors.items()}
        # Starting an actor imports torch and loads weights: allow more than one message's timeout.
        timeout = self.opts.timeout_s * (3 if startup else 1)
        return {stage: self._get(ref, stage, method, timeout) for stage, ref in refs.items()}

    def _dead_stages(self) -> list[str]:
        dead = []
        refs = {stage: actor.ping.remote() for stage, actor in self._actors.items()}
        for stage, ref in refs.items():
            try:
                self._ray.get(ref, timeout=10)
            except Exception:  # noqa: BLE001 - dead or unresponsive
                dead.append(stage)
        return dead

    # ------------------------------------------------------------------------------------------- run
    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def run(self, streams: list[SegmentSource], resume: dict[str, StreamState] | None = None,
            memory_off: bool | None = None) -> Iterator[SegmentResult]:
        """Stream every source through the pipeline; yields each segment's result once, in order per stream.

        resume: per stream id, the state to continue from (e.g. a previous run's final_states()).
        memory_off: override the option for this run."""
        if self._ray is None:
            raise TitansError("the pipeline is not started (use `with Pipeline(...) as pipe`)")
        if not self._actors:  # stopped after an abandoned run
            self._start_stages()
        ids = [s.stream_id for s in streams]
        if len(set(ids)) != len(ids):
            raise InputError("stream ids must be unique")
        resume = dict(resume or {})
        unknown = set(resume) - set(ids)
        if unknown:
            raise InputError(f"resume state for unknown stream {sorted(unknown)[0]!r}")
        first = self._next_stream_index
        self._next_stream_index += len(streams)
        bases = [resume[s.stream_id].position if s.stream_id in resume else 0 for s in streams]
        sched = Scheduler(list(streams), self.opts.max_in_flight, bases)
        store = SnapshotStore(self.work_dir)
        self._memory_off = self.opts.memory_off if memory_off is None else memory_off
        self._snapshots: dict[int, tuple[Snapshot, Any]] = {}
        index = lambda i: first + i  # noqa: E731 - the stages' (global) index of stream i of this run
        try:
            while not sched.done or self._pending:
                try:
                    for i in sched.activate():
                        store.clear(index(i))
                        self._set_stream_state(index(i), resume.get(ids[i]))
                    while self._free_slots:
                        work = sched.next_work()
                        if work is None:
                            break
                        self._submit(work, index(work.stream), store)
                    if not self._pending:
                        if not sched.done and not sched.waiting:  # would spin forever: a scheduler bug
                            raise TitansError("internal error: active streams but no segment to run")
                        continue
                    for flight, results in self._collect():
                        work = flight.work
                        if flight.snapshot is not None:
                            snap = Snapshot(work.stream_id, work.seq_no, work.position + len(work.tokens),
                                            _cursor_dict(work.cursor_after), *flight.snapshot)
                            store.commit(index(work.stream), snap)
                            self._snapshots[work.stream] = (snap, work.cursor_after)
                        if work.is_last:
                            self._fetch_final(index(work.stream), work)
                        if sched.complete(work):
                            yield self._result(work, results)
                except StageFailure as failure:
                    self._recover(failure, sched, resume, index)
        finally:
            self._drain()

    def _set_stream_state(self, stream: int, state: StreamState | None) -> None:
        core = None if state is None else self._ray.put(state.core)
        memory = None if state is None else self._ray.put(state.memory)
        self._get(self._actors["core"].set_state.remote(stream, core), "core", "load a stream state")
        self._get(self._actors["long_term_memory"].set_state.remote(stream, memory), "long_term_memory",
                  "load a stream state")

    def _submit(self, work: Work, stream: int, store: SnapshotStore) -> None:
        vocab = self.config.model.vocab_size
        if len(work.tokens) and (int(work.tokens.min()) < 0 or int(work.tokens.max()) >= vocab):
            raise InputError(f"{work.stream_id}: token id outside the model's vocabulary 0..{vocab - 1} "
                             f"(segment {work.seq_no}); wrong tokenizer for this model?")
        slot = self._free_slots.pop()
        every = self.opts.checkpoint_every
        snapshot = None
        if every and (work.seq_no + 1) % every == 0 and not work.is_last:
            snapshot = store.paths(stream, work.seq_no)
        a = self._actors
        refs = {
            "core": a["core"].process.remote(slot, stream, work.seq_no, work.position, work.tokens, self.opts.task_id,
                                             snapshot[0] if snapshot else None),
            "long_term_memory": a["long_term_memory"].process.remote(
                slot, stream, work.seq_no, work.position, len(work.tokens), self._memory_off,
                snapshot[1] if snapshot else None),
            "persistent_memory": a["persistent_memory"].process.remote(slot, stream, work.seq_no, work.targets),
        }
        self._pending[slot] = _InFlight(work, refs, snapshot)

    def _collect(self) -> list[tuple[_InFlight, dict[str, Any]]]:
        """Wait until at least one in-flight segment is done (or something failed); return the done ones."""
        ray = self._ray
        owner = {ref: (slot, stage) for slot, f in self._pending.items() for stage, ref in f.refs.items()}
        refs = list(owner)
        waited = 0.0
        while True:
            ready, _ = ray.wait(refs, num_returns=1, timeout=_POLL_S)
            if ready:
                break
            waited += _POLL_S
            if waited >= self.opts.timeout_s:
                dead = self._dead_stages()
                what = f"stage {', '.join(dead)} is dead" if dead else "no stage made progress"
                raise StageFailure(f"pipeline stalled for {waited:.0f} s: {what}", dead[0] if dead else None,
                                   died=bool(dead))
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        # A failed call fails its segment now: its peers may still be blocked waiting for it.
        failures = []
        for ref in ready:
            slot, stage = owner[ref]
            flight = self._pending[slot]
            try:
                self._get(ref, stage, f"process {flight.work.stream_id} segment {flight.work.seq_no}")
            except StageFailure as failure:
                failures.append(failure)
        if failures:
            # Blame the stage that died, not the peers whose messages to it failed.
            died = [f for f in failures if f.died]
            if died:
                raise died[0]
            dead = self._dead_stages()
            if dead:
                raise StageFailure(f"stage {dead[0]} died ({failures[0]})", dead[0], died=True)
            raise failures[0]
        done = []
        for slot, flight in list(self._pending.items()):
            if all(ref in ready for ref in flight.refs.values()):
                results = {stage: ray.get(ref) for stage, ref in flight.refs.items()}
                del self._pending[slot]
                self._free_slots.append(slot)
                done.append((flight, results))
        return done

    def _result(self, work: Work, results: dict[str, Any]) -> SegmentResult:
        pers = results["persistent_memory"]
        n = pers["n_predicted"]
        loss = pers["loss_sum"] / n if n else math.nan
        return SegmentResult(
            stream=work.stream_id, seq_no=work.seq_no, token_start=work.token_start, token_end=work.token_end,
            loss=loss, bits_per_token=loss / math.log(2), surprise=results["long_term_memory"]["surprise"],
            knowledge_attention=results["core"]["knowledge_attention"],
            stage_ms={stage: results[stage]["busy_ms"] for stage in STAGES}, n_predicted=n,
        )

    def _fetch_final(self, stream: int, work: Work) -> None:
        core = self._get(self._actors["core"].get_state.remote(stream, True), "core", "return a final state")
        memory = self._get(self._actors["long_term_memory"].get_state.remote(stream, True), "long_term_memory",
                           "return a final state")
        self._final[work.stream_id] = StreamState(position=work.position + len(work.tokens), core=core, memory=memory)

    def _drain(self) -> None:
        """After an abandoned run (the caller stopped iterating, an error): let the segments in flight
        finish so their slots are clean; stages that do not finish soon are restarted at the next run."""
        if not self._pending or not self._actors:
            self._pending = {}
            return
        refs = [ref for f in self._pending.values() for ref in f.refs.values()]
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=min(self.opts.timeout_s, 10.0))
        if len(ready) < len(refs):
            self._stop_stages()
        self._free_slots = list(range(self.opts.max_in_flight))
        self._pending = {}

    # -------------------------------------------------------------------------------------- recovery
    def _recover(self, failure: StageFailure, sched: Scheduler, resume: dict[str, StreamState], index) -> None:
        if not self.opts.checkpoint_every:
            self._stop_stages()
            raise TitansError(f"{failure} — checkpointing is off (checkpoint_every=0), so the run cannot "
                              "recover; the pipeline was stopped") from None
        if self.restarts >= self.opts.max_restarts:
            self._stop_stages()
            raise TitansError(f"{failure} — giving up after {self.restarts} restarts") from None
        self.restarts += 1
        log.warning("%s; restarting the stages (restart %d of %d)", failure, self.restarts, self.opts.max_restarts)
        self._stop_stages()
        self._start_stages()
        resumed: dict[str, int | None] = {}
        self.recoveries.append({"error": str(failure), "stage": failure.stage, "resumed_after": resumed})
        for i in list(sched.active):
            snap = self._snapshots.get(i)
            resumed[sched.streams[i].source.stream_id] = None if snap is None else snap[0].seq_no
            if snap is None:  # no snapshot yet: the stream starts over from its beginning
                self._set_stream_state(index(i), resume.get(sched.streams[i].source.stream_id))
                sched.rewind(i, None)
            else:
                snapshot, cursor = snap
                self._get(self._actors["core"].set_state.remote(index(i), snapshot.core_file), "core",
                          "load a snapshot")
                self._get(self._actors["long_term_memory"].set_state.remote(index(i), snapshot.memory_file),
                          "long_term_memory", "load a snapshot")
                sched.rewind(i, cursor)

    # --------------------------------------------------------------------------------------- results
    def final_states(self) -> dict[str, StreamState]:
        """Each finished stream's whole state (core + long-term memory), TitanModel's layout."""
        return dict(self._final)

    def stage_stats(self) -> dict[str, dict[str, Any]]:
        stats = {stage: self._get(actor.stats.remote(), stage, "report stats") for stage, actor in self._actors.items()}
        for stage, s in stats.items():
            s["busy_fraction"] = s["busy_s"] / s["wall_s"] if s["wall_s"] else 0.0
            if self.plan is not None:
                s["budget_bytes"] = self.plan.stages[stage].budget_bytes
                s["planned_bytes"] = self.plan.stages[stage].total_bytes
        return stats


def _cursor_dict(cursor: Any) -> Any:
    return cursor.to_dict() if hasattr(cursor, "to_dict") else cursor


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
