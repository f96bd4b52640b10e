"""Trials on the workers of a Dask cluster: ``autoreg tune ... --dask-scheduler ADDRESS`` (``DaskRunner``).

Design (the README says the same for users):

* **One long task per worker.** The tune submits one ``cluster_worker`` task to each worker of the cluster (pinned
  to it; ``--jobs`` caps how many), and that task runs the same loop as a local worker (``workers.run_trials``)
  until the study holds its trials, the time is up or the tune stops. The pairs, the config and the search space
  are sent once (``client.scatter``), so a worker needs neither PAIR.yaml nor the images on its disks and loads its
  data once however many trials it runs. ITK uses as many threads as the worker has (``dask worker --nthreads``);
  one task per worker keeps ITK's process-wide thread setting and SimpleITK's memory to one trial at a time.
* **An exact budget.** Workers count and ask under a ``distributed.Lock`` named after the storage and the study,
  which every worker of the cluster reaches.
* **Storage every worker reaches.** A URL storage (PostgreSQL...) is opened by each worker itself. The journal is
  written directly by each worker that sees the study's folder (a shared filesystem; checked with a token file the
  tune writes there, not by the path alone), and through the scheduler by the others: Optuna's ``DaskStorage``
  holds the same journal file in the scheduler's process, which must then see the folder.
* **Artifacts that follow the trials.** A worker that sees the study folder stores an improving trial's transform,
  PNG and CSV in ``<study dir>/artifacts`` as a local worker does; the others send the files to the tune through a
  ``distributed.Queue``, and the tune writes them into that store under the ids recorded with the trial.
* **Dead workers.** The tune watches the cluster's membership. A worker that leaves (killed, lost) has the trial
  it ran failed ("worker died") and queued again once, exactly as for local workers (``study.fail_trials``); a
  worker that joins (a nanny's restart, an adaptive cluster) gets a task of its own. The pairs are scattered to
  one worker and copied by the others; once every worker holding them has left, the tune sends them again, and a
  task submitted with the lost copy (the scheduler forgets it, its future stays pending) is submitted again.
* **Ctrl-C.** The tune sets a ``distributed.Event`` that every task polls (with its registration's stop check), and
  after ``tuning.GRACE_S`` cancels the tasks and fails the trials they still run as 'interrupted'. (Dask cannot
  stop a thread: one inside a long SimpleITK call stops at its next iteration, finding its trial finished.)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import ArtifactRecorder, artifact_store
from .errors import UserError, excerpt, special_file
from .study import fail_trials, journal_lock, redact, running_trials_of
from .trial import INTERRUPTED
from .tuning import TuneEvent
from .workers import WorkerData, WorkerPlan, run_trials

if TYPE_CHECKING:
    import optuna

    from .workers import StopRequest

log = logging.getLogger(__name__)

#: How often a task asks the scheduler whether the tune asked it to stop (and whether it was cancelled).
STOP_POLL_S = 0.25
#: How often the tune looks at the cluster: membership, finished tasks, artifacts sent to it.
SUPERVISE_S = 0.25
#: Connecting to the scheduler and asking the workers what they see gives up after this long.
CONNECT_TIMEOUT_S = 20
#: Tasks that end in an error (not a worker leaving) before the tune gives up.
MAX_TASK_ERRORS = 4


@dataclass(frozen=True)
class Route:
    """How one cluster worker reaches the study, decided by the tune from what the worker sees."""

    lock: str  # the budget's distributed.Lock
    stop_event: str  # set by the tune on Ctrl-C
    threads: int  # ITK threads: the worker's own (1 for deterministic studies)
    dask_storage: str | None = None  # the DaskStorage name, when the worker cannot see the journal
    artifact_queue: str | None = None  # the Queue name, when the worker cannot see the study folder


# --- in the workers -------------------------------------------------------------------------------------------


def identity() -> str:
    """How trials name the process that runs them (``Objective.worker``): host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def probe(tokens: dict[str, str]) -> dict[str, Any]:
    """Run on every worker (and the scheduler): its identity and which of the tune's token files (path -> content)
    it reads with the same content, i.e. which of the tune's folders it shares. Importing this module there also
    shows that autoreg is installed."""
    seen = []
    for path, content in tokens.items():
        try:
            if Path(path).read_text(encoding="utf-8") == content:
                seen.append(path)
        except OSError:
            pass
    from . import __version__

    return {"worker": identity(), "seen": seen, "version": __version__}


def probe_scheduler(tokens: dict[str, str], dask_scheduler: Any = None) -> dict[str, Any]:
    """``probe`` in the scheduler's process, and whether Optuna's DaskStorage can live there."""
    out = probe(tokens)
    try:
        import optuna_integration  # noqa: F401

        out["dask_storage"] = True
    except ImportError:
        out["dask_storage"] = False
    return out


def forget_storage(name: str, dask_scheduler: Any = None) -> None:
    """Drop a tune's DaskStorage from the scheduler once the tune is over."""
    extension = dask_scheduler.extensions.get("optuna") if dask_scheduler is not None else None
    if extension is not None:
        extension.storages.pop(name, None)


class ClusterStop:
    """A task's stop check: true once the tune set its event, or the scheduler cancelled this task (the tune was
    interrupted or died). Asked at every optimizer iteration, so the scheduler is asked at most every
    ``STOP_POLL_S``; ``now()`` asks at once."""

    def __init__(self, event_name: str):
        from distributed import Event
        from distributed.worker import thread_state

        self.event = Event(event_name)
        self.key = getattr(thread_state, "key", None)
        self._checked = 0.0
        self._stopped = False

    def __call__(self) -> bool:
        if not self._stopped and time.monotonic() - self._checked > STOP_POLL_S:
            self._checked = time.monotonic()
            try:
                self._stopped = self.event.is_set() or not self._wanted()
            except Exception as err:  # noqa: BLE001 - the scheduler is gone: nobody waits for our trials
                log.warning("cannot reach the scheduler (%s); stopping", err)
                self._stopped = True
        return self._stopped

    def now(self) -> bool:
        self._checked = 0.0
        return self()

    def _wanted(self) -> bool:
        from distributed import get_worker

        task = get_worker().state.tasks.get(self.key) if self.key is not None else None
        return task is None or task.state not in ("cancelled", "released", "forgotten")


class _QueueStore:
    """An artifact store that sends each file to the tune (Optuna's ``ArtifactStore`` protocol, write side only)."""

    def __init__(self, queue_name: str):
        from distributed import Queue

        self.queue = Queue(queue_name)

    def write(self, artifact_id: str, content_body: Any) -> None:
        self.queue.put((artifact_id, content_body.read()))

    def open_reader(self, artifact_id: str) -> Any:
        raise NotImplementedError("artifacts sent to the tune are read from the study's folder")

    def remove(self, artifact_id: str) -> None:
        raise NotImplementedError("artifacts sent to the tune are removed from the study's folder")


class SendingRecorder(ArtifactRecorder):
    """``ArtifactRecorder`` for a worker that cannot see the study folder: the files travel to the tune."""

    def __init__(self, queue_name: str):
        super().__init__("")
        self._store = _QueueStore(queue_name)  # type: ignore[assignment]


def open_dask_storage(name: str, client: Any = None) -> optuna.storages.BaseStorage:
    import optuna
    from optuna_integration import DaskStorage

    with warnings.catch_warnings():  # 'experimental' since Optuna 3.1, and the documented way
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return DaskStorage(None, name=name, client=client, register=False)


def cluster_worker(plan: WorkerPlan, index: int, route: Route, data: WorkerData) -> int:
    """The task each cluster worker runs: the local worker loop with what this worker reaches; returns its trials."""
    from distributed import Lock

    from .study import open_storage

    logging.getLogger("autoreg.study").setLevel(logging.ERROR)  # the tune already reported a torn journal line
    stop = ClusterStop(route.stop_event)
    storage = open_dask_storage(route.dask_storage) if route.dask_storage else open_storage(plan.storage)
    recorder = SendingRecorder(route.artifact_queue) if route.artifact_queue else None
    return run_trials(
        replace(plan, threads=route.threads, stop_file=None),
        index,
        stop,
        data=data,
        storage=storage,
        lock=lambda: Lock(route.lock),
        recorder=recorder,
        calibrate_under_lock=True,
    )


# --- in the tune ----------------------------------------------------------------------------------------------


#: A scheduler address: ``[scheme://]host:port`` (a name, IPv4, or a bracketed IPv6 address), no user or password.
_ADDRESS = re.compile(
    r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})/?$"
)
#: A scheduler file larger than this is not one (Dask writes a few hundred bytes).
_MAX_SCHEDULER_FILE = 1_000_000


def scheduler_address(given: str) -> str:
    """The scheduler address ``given``, or the one its scheduler file names, checked for form; one-line errors that
    never quote a password."""
    key = "--dask-scheduler"
    shown = excerpt(redact(given), quote=False)
    path = Path(given).expanduser()
    if "://" not in given and (path.exists() or path.suffix == ".json" or os.sep in given):
        if not path.is_file() or special_file(path):
            raise UserError(
                f"scheduler file {shown} not found (a file written by dask scheduler --scheduler-file)", key=key
            )
        try:
            data = json.loads(path.read_bytes()[:_MAX_SCHEDULER_FILE])
            address = data["address"]
            if not isinstance(address, str):
                raise TypeError(address)
        except (ValueError, KeyError, TypeError):
            raise UserError(f'{shown} is not a Dask scheduler file (JSON with an "address")', key=key) from None
    else:
        address = given
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        got = excerpt(redact(address), quote=False)
        raise UserError(
            f"expected a scheduler address such as tcp://10.0.0.5:8786, or a scheduler file (got {got})", key=key
        )
    return address


def _unreachable(address: str, err: BaseException | str) -> UserError:
    """The one line for a scheduler that does not answer as one: the address, and the first line of why."""
    why = err if isinstance(err, str) else "timed out" if isinstance(err, TimeoutError) else str(err).strip()
    why = why.splitlines()[0] if why else type(err).__name__
    return UserError(
        f"cannot reach the Dask scheduler at {excerpt(address, quote=False)} ({excerpt(why, 200, quote=False)})",
        key="--dask-scheduler",
    )


def _greet(address: str) -> None:
    """Ask ``address`` who it is before building a client: a client that fails to start leaves a half-built object
    whose clean-up waits twice its timeout and prints a traceback; a plain request fails at once and cleanly."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.core import rpc

    async def identity() -> Any:
        async with rpc(address, timeout=CONNECT_TIMEOUT_S) as scheduler:
            return await asyncio.wait_for(scheduler.identity(), CONNECT_TIMEOUT_S)

    match = _ADDRESS.match(address)
    if match is not None and match["scheme"] in (None, "tcp", "tls"):  # refused at once, not after Dask's retries
        try:
            socket.create_connection((match["host"].strip("[]"), int(match["port"])), CONNECT_TIMEOUT_S).close()
        except OSError as err:
            raise _unreachable(address, err.strerror or err) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # in a thread of its own: a notebook's thread already runs an event loop, where asyncio.run refuses
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(asyncio.run, identity()).result()
    except Exception as err:  # noqa: BLE001 - refused, timed out, or something that is not Dask answered
        raise _unreachable(address, err) from None
    if not (isinstance(answer, dict) and answer.get("type") == "Scheduler"):
        raise _unreachable(address, "not a Dask scheduler")


def connect(given: str) -> Any:
    """A client of the scheduler at ``given`` (``tcp://host:port``, or a scheduler file); one-line errors."""
    try:
        from distributed import Client
    except ImportError:
        raise UserError(
            "needs dask.distributed, which is not installed; pip install 'autoreg[dask]'", key="--dask-scheduler"
        ) from None
    address = scheduler_address(given)
    _greet(address)
    if not log.isEnabledFor(logging.INFO):  # without -v the tune says what went wrong in its own one line
        for name in ["distributed", *(n for n in logging.root.manager.loggerDict if n.startswith("distributed."))]:
            logging.getLogger(name).setLevel(logging.CRITICAL)  # Dask's config gives some their own levels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # version mismatches are the user's to see with -v
            return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except Exception as err:  # noqa: BLE001 - something that answers, but not as a Dask scheduler
        raise _unreachable(address, err) from None


def _name(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@dataclass
class _Slot:
    """One worker of the cluster as the tune knows it."""

    address: str
    worker: str  # host:pid
    route: Route | None  # None: it cannot reach the study
    future: Any = None
    data: Any = None  # the scattered pair data its task depends on


class DaskRunner:
    """Runs a tune's trials on a Dask cluster (see the module's docstring)."""

    def __init__(
        self,
        address: str,
        plan: WorkerPlan,
        study: optuna.Study,
        pipe: Any,
        directory: Path,
        *,
        jobs: int | None,
        timeout: float | None,
        emit: Callable[[TuneEvent], None],
        route: str = "auto",
    ):
        self.address, self.plan, self.study, self.pipe, self.directory = address, plan, study, pipe, directory
        self.jobs, self.timeout, self.emit, self.force_scheduler = jobs, timeout, emit, route == "scheduler"
        self.error: BaseException | None = None
        self.interrupted = False
        self.client: Any = None
        self.slots: dict[str, _Slot] = {}
        self.dead: set[str] = set()
        self._token = secrets.token_hex(8)
        self._tokens: dict[str, str] = {}  # token file -> its content, one per folder the workers should see
        self._journal_token: str | None = None
        self._study_token = ""
        self._scheduler: dict[str, Any] = {"seen": [], "dask_storage": False}
        self._lock = ""
        self._storage_name: str | None = None
        self._queue: Any = None
        self._event: Any = None
        self._data: Any = None
        self._stop: StopRequest | None = None
        self._done = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._submitted = 0
        self._errors = 0
        self._finished = False
        self._waiting_said = False
        self.threads = 1

    # --- setting up ---------------------------------------------------------------------------------------------

    def prepare(self) -> WorkerPlan:
        from distributed import Event, Queue

        self.client = connect(self.address)
        spec = self.plan.storage
        if spec.url.startswith("sqlite"):
            raise UserError(
                "SQLite is one process's storage, not a cluster's; use the journal (default) on a shared "
                "folder or postgresql://...",
                key="--storage",
            )
        journal = Path(spec.url) if spec.local_journal else None
        folders = {self.directory.resolve()} | ({journal.parent.resolve()} if journal is not None else set())
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f".cluster-{self._token}"
            path.write_text(self._token, encoding="utf-8")
            self._tokens[str(path)] = self._token
        self._journal_token = str(journal.parent.resolve() / f".cluster-{self._token}") if journal else None
        self._study_token = str(self.directory.resolve() / f".cluster-{self._token}")
        try:
            self._scheduler = self.client.run_on_scheduler(probe_scheduler, self._tokens)
        except Exception as err:  # noqa: BLE001 - autoreg missing there, most likely
            log.info("the scheduler cannot run autoreg's probe: %s", err)
            self._scheduler = {"seen": [], "dask_storage": False}
        key = _name(spec.display, self.plan.study_name)
        self._lock = f"autoreg-budget-{key}"
        self._event = Event(f"autoreg-stop-{self._token}", client=self.client)
        self._queue = Queue(f"autoreg-artifacts-{self._token}", client=self.client)
        self._scatter()
        workers = self._workers()
        if not workers:
            self.emit(TuneEvent("cluster", f"the Dask cluster at {self.address} has no workers yet; waiting"))
            self._waiting_said = True
        self._meet(workers, strict=True)
        reachable = [s for s in self.slots.values() if s.route is not None]
        if self.slots and not reachable:
            raise UserError(self._why_unreachable(), key="--dask-scheduler")
        n = self._cap(len(reachable)) or 1
        self.threads = max((s.route.threads for s in reachable), default=1)
        target = self.plan.n_trials
        budget = self.timeout * n / target if self.timeout and target else None
        self.plan = replace(self.plan, trial_budget_s=budget, stop_file=None)
        return self.plan

    def _cap(self, n: int) -> int:
        return min(n, self.jobs) if self.jobs else n

    def _why_unreachable(self) -> str:
        return (
            f"no worker of the Dask cluster at {self.address} can reach the study: they do not see "
            f"{self.directory} and neither does the scheduler; put the study on a folder they share "
            "(--study-dir) or use --storage postgresql://..."
        )

    def _workers(self) -> dict[str, dict]:
        return dict(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def _meet(self, workers: dict[str, dict], *, strict: bool = False) -> None:
        """Probe workers not seen before and decide how each reaches the study. A worker that cannot run autoreg
        stops the tune at its start (``strict``); one that joins later is left out with a line."""
        new = [a for a in workers if a not in self.slots]
        if not new:
            return
        try:
            seen = self.client.run(probe, self._tokens, workers=new, on_error="return")
        except Exception as err:  # noqa: BLE001
            raise UserError(f"cannot ask the Dask workers what they see ({err})", key="--dask-scheduler") from None
        for address in new:
            answer = seen.get(address)
            if isinstance(answer, BaseException) or answer is None:
                if answer is None:
                    continue  # it left meanwhile
                why = (
                    f"the Dask worker {address} cannot run autoreg ({type(answer).__name__}: "
                    f"{excerpt(str(answer), 200, quote=False)}); install autoreg and its dependencies in the "
                    "workers' environment"
                )
                if strict:
                    raise UserError(why, key="--dask-scheduler")
                self.slots[address] = _Slot(address, "", None)
                self.emit(TuneEvent("cluster", f"{why}: it takes no trials"))
                continue
            nthreads = int(workers[address].get("nthreads") or 1)
            route = self._route(answer, nthreads)
            self.slots[address] = _Slot(address, answer["worker"], route)
            if route is None:
                self.emit(
                    TuneEvent(
                        "cluster",
                        f"Dask worker {address} ({answer['worker']}) cannot reach the study "
                        "(it does not see the study folder, nor does the scheduler): it takes "
                        "no trials",
                    )
                )
            else:
                how = (
                    "storage "
                    + ("through the scheduler (DaskStorage)" if route.dask_storage else "direct")
                    + ", artifacts "
                    + ("sent to the tune" if route.artifact_queue else "written to the study folder")
                )
                self.emit(
                    TuneEvent(
                        "cluster", f"Dask worker {address} ({answer['worker']}, {route.threads} ITK thread(s)): {how}"
                    )
                )

    def _route(self, answer: dict, nthreads: int) -> Route | None:
        sees = set(answer.get("seen", []))
        scheduler_sees = set(self._scheduler.get("seen", []))
        threads = 1 if self.plan.cfg.deterministic else max(1, nthreads)
        dask_storage = artifact_queue = None
        if self._journal_token is not None and (self.force_scheduler or self._journal_token not in sees):
            if self._journal_token not in scheduler_sees or not self._scheduler.get("dask_storage"):
                return None
            dask_storage = self._dask_storage()
        if self.force_scheduler or self._study_token not in sees:
            artifact_queue = self._queue.name
        return Route(
            lock=self._lock,
            stop_event=self._event.name,
            threads=threads,
            dask_storage=dask_storage,
            artifact_queue=artifact_queue,
        )

    def _dask_storage(self) -> str:
        """Register (once) a DaskStorage holding the study's journal in the scheduler's process."""
        if self._storage_name is None:
            import optuna
            from optuna.storages import JournalStorage
            from optuna_integration import DaskStorage

            from .study import RepairingJournalFileBackend

            journal = Path(self.plan.storage.url)
            base = JournalStorage(RepairingJournalFileBackend(str(journal), lock_obj=journal_lock(journal)))
            name = f"autoreg-{self._token}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                DaskStorage(storage=base, name=name, client=self.client)
            self._storage_name = name
        return self._storage_name

    def describe(self) -> str:
        n = self._cap(sum(s.route is not None for s in self.slots.values()))
        return f"{n} Dask worker(s) at {self.address} x {self.threads} ITK thread(s)"

    # --- running ------------------------------------------------------------------------------------------------

    def start(self, stop: StopRequest) -> None:
        self._stop = stop
        self._thread = threading.Thread(target=self._supervise, name="autoreg-dask", daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def _supervise(self) -> None:
        try:
            while not self._halt.is_set():
                if self._stop is not None and self._stop() and not self._event.is_set():
                    self._event.set()  # the tasks stop their registration at its next iteration
                self._receive_artifacts()
                self._watch()
                if self._over():
                    break
                self._halt.wait(SUPERVISE_S)
        except BaseException as err:  # noqa: BLE001 - handed to the tune's main thread
            if not self._halt.is_set():
                self.error = self._explained(err)
                self._cancel()
        finally:
            try:
                self._receive_artifacts()
            except Exception as err:  # noqa: BLE001
                log.warning("could not receive the last artifacts: %s", err)
            self._done.set()

    def _explained(self, err: BaseException) -> BaseException:
        """A scheduler that died or went out of reach is told in one line (the finished trials are in the storage
        and the study resumes); an error of autoreg's own stays what it is."""
        if isinstance(err, UserError) or not (
            isinstance(err, OSError) or (self.client is not None and self.client.status != "running")
        ):
            return err
        return UserError(
            f"lost the Dask scheduler at {excerpt(self.address, quote=False)} ({type(err).__name__}: "
            f"{excerpt(str(err) or 'no detail', 200, quote=False)}); every finished trial is kept: run the same "
            "command again to resume, on this cluster once it is back or on another",
            key="--dask-scheduler",
        )

    def _watch(self) -> None:
        if self.client.status in ("closing", "closed", "failed"):  # Dask gave up reconnecting to the scheduler
            raise ConnectionError("no answer within Dask's reconnect timeout")
        if self.client.status == "connecting":  # what it knew of the workers is gone, not the workers themselves
            if not self._waiting_said:
                self.emit(TuneEvent("cluster", f"the Dask scheduler at {self.address} does not answer; waiting"))
                self._waiting_said = True
            return
        workers = self._workers()
        for address in [a for a in self.slots if a not in workers]:
            self._lost(self.slots.pop(address))
        self._meet(workers)
        for slot in self.slots.values():
            if slot.future is not None and slot.future.done():
                self._collect(slot)
            elif self._stranded(slot):
                slot.future.cancel()
                slot.future = None  # submitted again below, with the data sent again
        if self._more_wanted():
            busy = sum(s.future is not None for s in self.slots.values())
            for slot in self.slots.values():
                if busy >= self._cap(len(self.slots)) or not self._more_wanted():
                    break
                if slot.route is not None and slot.future is None and slot.worker not in self.dead:
                    self._submit(slot)
                    busy += 1
        if not workers and not self._waiting_said and self._more_wanted():
            self.emit(TuneEvent("cluster", f"no Dask workers at {self.address}; waiting for some"))
            self._waiting_said = True
        elif workers:
            self._waiting_said = False

    def _scatter(self) -> None:
        """Send the pairs to the cluster (once, and again after every worker that held them has left)."""
        self._data = self.client.scatter(WorkerData.of(self.pipe), hash=False)

    def _stranded(self, slot: _Slot) -> bool:
        """Whether the slot's task depends on pair data the cluster lost: the scheduler forgets such a task while
        its future stays pending, so it would never run (every worker that held the data was killed)."""
        return slot.future is not None and not slot.future.done() and slot.data.status != "finished"

    def _submit(self, slot: _Slot) -> None:
        if self._data.status != "finished":
            log.info("the cluster lost the pairs' data with its workers; sending it again")
            self._scatter()
        index = self._submitted
        self._submitted += 1
        slot.data = self._data
        slot.future = self.client.submit(
            cluster_worker,
            self.plan,
            index,
            slot.route,
            self._data,
            key=f"autoreg-trials-{self._token}-{index}",
            workers=[slot.address],
            allow_other_workers=False,
            pure=False,
            retries=0,
        )

    def _collect(self, slot: _Slot) -> None:
        future, slot.future = slot.future, None
        if future.status == "finished":
            ran = future.result()
            log.info("Dask worker %s ran %s trial(s)", slot.address, ran)
            # the budget is spent, the time is up or the tune stopped; unless a dead worker's trial was queued again
            # since (its retry runs on a worker whose task ended), and this task found something to run
            self._finished = not ran or not self._more_wanted()
            return
        if future.status == "cancelled":
            return
        err = future.exception()
        if isinstance(err, UserError):
            raise UserError(f"on Dask worker {slot.address}: {err}") from None
        self._errors += 1
        log.warning("the task on Dask worker %s failed: %s: %s", slot.address, type(err).__name__, err)
        if self._errors >= MAX_TASK_ERRORS:
            raise err

    def _lost(self, slot: _Slot) -> None:
        """A worker left the cluster: its trial failed and queued again once (as for a local worker that died)."""
        self.dead.add(slot.worker)
        if slot.future is not None:
            slot.future.cancel()
        reaped = fail_trials(self.study, running_trials_of(self.study, {slot.worker}))
        if reaped:
            # the others may have ended, counting this trial while it ran: its retry is still to run
            self._finished = False
            self.emit(
                TuneEvent(
                    "reaped",
                    f"Dask worker {slot.address} ({slot.worker}) left the cluster; its trial(s) "
                    f"{reaped} were failed and queued again",
                )
            )

    def _more_wanted(self) -> bool:
        """Whether more trials are to run: not stopped, not past the deadline, the budget not spent."""
        from .workers import budget_spent

        if self._finished or self._halt.is_set() or (self._stop is not None and self._stop()):
            return False
        if self.plan.deadline is not None and time.time() >= self.plan.deadline:
            return False
        if self.plan.n_trials is None:
            return True
        return not budget_spent(self.study.get_trials(deepcopy=False), self.plan.n_trials)

    def _over(self) -> bool:
        running = any(s.future is not None for s in self.slots.values())
        return not running and not self._more_wanted()

    def _receive_artifacts(self) -> None:
        """Write the files that workers without the study folder sent into the study's artifact store."""
        if self._queue is None or self.client is None or self.client.status != "running":
            return
        if self._queue.qsize() == 0:
            return
        items = self._queue.get(batch=True)
        store = artifact_store(self.directory)
        for artifact_id, body in items:
            store.write(artifact_id, io.BytesIO(body))
        log.info("received %d artifact file(s) from the cluster", len(items))

    # --- stopping -----------------------------------------------------------------------------------------------

    def _cancel(self) -> None:
        try:
            self._event.set()
        except Exception:  # noqa: BLE001
            pass
        futures = [s.future for s in self.slots.values() if s.future is not None]
        if futures:
            try:
                self.client.cancel(futures, force=True)
            except Exception:  # noqa: BLE001
                pass

    def abort(self) -> list[int]:
        """Ctrl-C after the grace: cancel the tasks and fail the trials they still run as 'interrupted'."""
        self._halt.set()
        running = {s.worker for s in self.slots.values() if s.future is not None}
        self._cancel()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return fail_trials(self.study, running_trials_of(self.study, running), reason=INTERRUPTED)

    def close(self) -> None:
        self._halt.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2.0)
        for path in self._tokens:
            Path(path).unlink(missing_ok=True)
        if self.client is None:
            return
        try:
            if self._storage_name is not None:
                self.client.run_on_scheduler(forget_storage, self._storage_name)
            if self._data is not None:
                self.client.cancel([self._data])
        except Exception as err:  # noqa: BLE001 - the scheduler may be gone
            log.info("cleaning up on the scheduler: %s", err)
        try:
            self.client.close(timeout=5)
        except Exception as err:  # noqa: BLE001 - the scheduler may be gone
            log.info("closing the Dask client: %s", err)


__all__ = ["DaskRunner", "Route", "cluster_worker", "connect", "identity", "probe"]
