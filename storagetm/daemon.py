"""The daemon: watch disks and addresses, keep the exports as desired, show the screen."""

from __future__ import annotations

import contextlib
import functools
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from msgspec.structs import replace

from storagetm import state
from storagetm.backing import modes
from storagetm.backing.layer import DM, HOLD, STORE, BackingLayer
from storagetm.config.options import with_credentials
from storagetm.config.settings import Settings
from storagetm.console import panel, qr, stats
from storagetm.console.screen import Screen, render
from storagetm.control import ControlServer
from storagetm.desired import desired_state
from storagetm.disks.disk import Disk, disk_from_file, resolve_file
from storagetm.disks.identity import default_nqn_base, host_id, host_identity, iqn_base, nvme_form
from storagetm.disks.policy import (
    Reason,
    SystemFacts,
    held_by_another,
    loader_partuuid,
    system_facts,
)
from storagetm.disks.udev import BlockDevices, udev_settled
from storagetm.errors import ExitCode, KernelError, StorageTMError, UsageError
from storagetm.fabrics import Fabric
from storagetm.fabrics.lio import configfs as lio
from storagetm.fabrics.lio.fabric import IscsiFabric
from storagetm.fabrics.lio.kernel import ensure_lio, lio_loaded
from storagetm.fabrics.nvmet import kernel
from storagetm.fabrics.nvmet.configfs import Root
from storagetm.fabrics.nvmet.fabric import NvmetFabric, discovery_group
from storagetm.model import ISCSI_PORT, Backing, Export, IscsiConfig, Want, WebConfig
from storagetm.reconcile.journal import Journal, fault_from_environment
from storagetm.reconcile.reconciler import Reconciler
from storagetm.security import auth, tls
from storagetm.security.auth import AuthConfig
from storagetm.security.chap import chap_secrets
from storagetm.selection import Plan, explicit_files, plan, refusal
from storagetm.system import firmware, network, power
from storagetm.system.log import Logger
from storagetm.system.notify import sd_notify
from storagetm.web.token import web_token

if TYPE_CHECKING:  # each imported where its feature runs: the mDNS announcement, the keys, the web page
    from storagetm.console.keys import KeyInput
    from storagetm.system.announce import Announcer
    from storagetm.web.server import WebServer

log = Logger(__name__)

REDRAW_DEBOUNCE = 0.75  # seconds, as upstream: addresses come and go in bursts
DASHBOARD_REFRESH = 1.0  # seconds between samples of I/O counters, connections and snapshot fill
# Without a dashboard on a terminal, and while no initiator is connected and no disk moves, the
# samples (for `storagetm status` and the web page) are this far apart.
IDLE_REFRESH = 5.0  # seconds
# Connected initiators are read from /proc/net/tcp{,6} (2-6 ms of CPU a time under emulation,
# most of an idle sample) when a disk moved since the last sample (a new initiator reads its
# partition table at once), else this far apart: a discovery-only visit or a departure shows
# within these seconds.
INITIATOR_POLL = 3.0  # seconds
READY_WAIT = 30.0  # seconds storagetm waits at most for udev's queue before it tells systemd it is ready
SETTLE_POLL = 0.1  # seconds between looks at udev's queue until then
# After a disk event, the screen and the state file follow this much later: the CPU goes first
# to the kernel telling watching initiators of the new disk, and a burst of events is drawn once.
AFTER_DISK_EVENT = 0.3  # seconds


def serve_at_realtime_priority() -> None:
    """SCHED_RR at the lowest real-time priority: on a hotplug udev's workers, PID 1 and
    journald wake with storagetm on the same CPU, and at any nice level the scheduler hands
    them the CPU every tick; storagetm's few milliseconds per event now run first. Called
    once started: at boot, storagetm's 1.5 s of start-up CPU must not run ahead of udev's
    coldplug, which loads the disk drivers. Children (dmsetup, losetup) get the normal policy."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    except OSError as exc:
        log.warning("cannot raise storagetm to real-time priority: %s; disk events wait their turn", exc.strerror)


@contextlib.contextmanager
def at_normal_priority() -> Iterator[None]:
    """The normal policy for a burst of work that must not run ahead of the I/O (at SCHED_RR,
    nvmet's workers would wait for it), then the policy before."""
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    if policy & ~os.SCHED_RESET_ON_FORK == os.SCHED_OTHER:
        yield
        return
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    try:
        yield
    finally:
        os.sched_setscheduler(0, policy, param)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        screen: Screen,
        root: Root | None = None,
        devices: BlockDevices | None = None,
        facts: Callable[[], SystemFacts] | None = None,
        startup_problems: list[str] | None = None,
        announcer: Announcer | None = None,
        held: Callable[[str], str] = held_by_another,
        journal: Journal | None = None,
        backing: BackingLayer | None = None,
        keyring: tls.Keyring | None = None,
        lio_root: lio.Root | None = None,
        keys: KeyInput | None = None,
        connection_text: Callable[[state.RunState, int], str] | None = None,
        control: ControlServer | None = None,
    ) -> None:
        self.settings = settings
        self.screen = screen
        self.root = root
        self.devices = devices
        # The loader's partition UUID is read once: it is fixed for the boot, and efivarfs is slow.
        self.facts = facts or functools.partial(system_facts, loader_partuuid())
        self.startup_problems = list(startup_problems or [])
        self.held = held
        self.in_use_refused = False  # set by each plan
        self.announcer = announcer or (announcement() if settings.announce else None)
        self.disks: dict[str, Disk] = {}
        # Bad options: drawn first on the screen; with a refusal nothing is exported.
        self.state = state.RunState(pid=os.getpid(), alerts=self.startup_problems, refused=list(settings.refusals))
        self.journal = journal or Journal(fault=fault_from_environment(os.environ.get("STORAGETM_TEST_KILL_AT")))
        self.backing = backing or BackingLayer()
        self.keyring = keyring or tls.Keyring()
        self.reconciler: Reconciler | None = None
        # iSCSI is offered only on a LIO root given here or found by run() (modules loaded).
        self.lio_root = lio_root
        self.iscsi_unavailable = ""
        self.fabrics: list[Fabric] = []
        self.wanted: dict[str, Export] = {}  # what the export policy chose, before any failure
        self.stop_requested = False
        self.end = power.End.STOP  # what follows the stop: asked for by a signal or a key
        self.keys = keys  # None: made by run() on the screen's consoles, if it has any
        self.panel = panel.Panel()
        self.connection_text = connection_text or qr.connection_text  # what the QR code holds
        self.host = ""  # this machine's id, for iSCSI's names
        self.qr_drawn: tuple[str, list[str]] = ("", [])
        self.meter = stats.ActivityMeter()
        self.saved_state = ""
        self.state_write_failed = False  # logged once until a write succeeds
        self.status_sent = ""
        self.ipv6 = True
        self.web: WebServer | None = None
        self.web_socket: socket.socket | None = None  # bound, its server not made until a connection comes
        self.moving = False  # the last sample saw I/O, an initiator connected, or a hash under way
        self.initiators_due = 0.0  # time.monotonic() when connected initiators are next read
        self.control = control  # None: made by run(); `storagetm FILE…` hands its files over through it
        self.handed: dict[int, tuple[str, ...]] = {}  # client -> the disks and files it handed over

    # ---- one reconcile pass ------------------------------------------------

    def attach(self, root: Root) -> None:
        """The fabrics and the reconciler, on this nvmet root. iSCSI's drivers are there even
        when it is off or unavailable (on LIO's usual root then): what a previous instance
        made on it is still found and removed."""
        self.root = root
        self.fabrics = [NvmetFabric(root, self.keyring), IscsiFabric(self.lio_root or lio.Root())]
        drivers = [driver for fabric in self.fabrics for driver in fabric.drivers()]
        self.reconciler = Reconciler([*self.backing.drivers(), *drivers], self.journal)

    def iscsi_config(self, host: str) -> IscsiConfig:
        """iSCSI as asked for and as the kernel allows, its CHAP secrets as NVMe/TCP's."""
        if not self.settings.iscsi:
            return IscsiConfig()
        if self.lio_root is None:
            return IscsiConfig(unavailable=self.iscsi_unavailable or "no LIO configfs root")
        secret, ctrl_secret = chap_secrets(self.state.auth, self.state.tls)
        return IscsiConfig(True, iqn_base(host), secret, ctrl_secret)

    def open_lio(self) -> None:
        """LIO's root for iSCSI, its kernel modules loaded if they are not (at boot: 1-2 s of
        modprobe, after the NVMe/TCP exports). Without it NVMe/TCP goes on and the screen
        says why there is no iSCSI."""
        if self.lio_root is not None or not self.settings.iscsi:
            return
        try:
            self.lio_root = lio.Root(ensure_lio())
        except KernelError as exc:
            self.iscsi_unavailable = exc.one_line()
            log.warning("iSCSI is unavailable: %s", self.iscsi_unavailable)

    def export_wanted(self) -> None:
        """Plan and apply the exports for the disks known now; the screen is not redrawn."""
        # What a previous instance exported counts as exported too: its objects are still in
        # the kernel (our dm devices hold those disks) until this pass adopts them.
        assert self.reconciler is not None
        result = self._plan()
        self.wanted = result.exports
        failures = self.reconcile()
        problems = result.problems + failures
        for problem in problems:
            if problem not in self.state.problems:
                log.warning("%s", problem)
        self.state.not_exported = [{"name": d.name, "device": d.devnode, "reason": result.why(d, r)}
                                   for d, r in result.not_exported]  # fmt: skip
        self.state.problems = problems
        self.in_use_refused = any(reason is Reason.IN_USE for _, reason in result.not_exported)

    def _plan(self) -> Plan:
        assert self.reconciler is not None
        exported = {export.disk.devnode for export in self.state.exports.values()} | {
            name for kind, name in self.reconciler.owned if kind == HOLD}
        return plan(list(self.disks.values()), self.selection(), self.facts(), self.state.nqn_base,
                    exported=exported, held=self.held)  # fmt: skip

    def selection(self) -> Settings:
        """The settings with the disks and files clients handed over named too."""
        handed = tuple(dict.fromkeys(spec for specs in self.handed.values() for spec in specs
                                     if spec not in self.settings.devices))  # fmt: skip
        return replace(self.settings, devices=self.settings.devices + handed) if handed else self.settings

    def want(self) -> Want:
        return Want(dict(self.wanted), self.state.nqn_base, self.settings.port, self.ipv6, self.state.auth,
                    self.state.tls, tuple(self.state.addresses), listen=not self.settings.refusals,
                    iscsi=self.state.iscsi)  # fmt: skip

    def reconcile(self) -> list[str]:
        """Make the kernel hold what is wanted now; the problems, one line each. An export
        whose objects could not all be made is not exported (the reconciler undid it)."""
        assert self.reconciler is not None and self.fabrics
        want = self.want()
        changing = {backing.path for nqn, backing in self.state.backings.items()
                    if _backing_key(want.exports.get(nqn)) != _backing_key(self.state.exports.get(nqn))}  # fmt: skip
        web = self.web
        if web is not None:  # downloads of what changes let go of its device first, and stay off it
            web.release(changing)
        try:
            failures = self.reconciler.apply(desired_state(want, self.backing, self.fabrics))
        finally:
            if web is not None:
                web.resume(changing)
        failed = {failure.group for failure in failures}
        before = self.state.exports
        self.state.exports = {nqn: export for nqn, export in want.exports.items() if nqn not in failed}
        for nqn, export in sorted(self.state.exports.items()):
            if nqn not in before:
                log.info("exported %s (%s) as %s", export.disk.devnode, export.mode.label, nqn)
            elif before[nqn].mode is not export.mode:
                log.info("%s is now %s", export.disk.devnode, export.mode.label)
            elif before[nqn].disk.size != export.disk.size:
                log.info("%s changed size: %d -> %d bytes", export.disk.devnode, before[nqn].disk.size,
                         export.disk.size)  # fmt: skip
        for nqn in sorted(set(before) - set(self.state.exports)):
            log.info("withdrew %s (%s)", nqn, before[nqn].disk.devnode)
        self.state.backings = {nqn: self._backing_view(export) for nqn, export in self.state.exports.items()}
        self.state.ports = [] if not want.listen or "" in failed else [
            listener for listener in want.listeners if discovery_group(listener) not in failed]  # fmt: skip
        return [failure.one_line() for failure in failures]

    def _backing_view(self, export: Export) -> Backing:
        if export.mode is modes.Mode.READ_WRITE:
            return Backing(export.disk.devnode)
        assert self.reconciler is not None
        name = modes.dm_name_for(export.nqn, export.mode)
        store = self.reconciler.owned.get((STORE, name))
        return Backing(f"/dev/mapper/{name}", name if (DM, name) in self.reconciler.owned else "",
                       store.facts.get("dir", "") if store else "")  # fmt: skip

    def reconcile_addresses(self) -> None:
        """The discovery ports and their referrals follow the target's addresses."""
        for problem in self.reconcile():
            if problem not in self.state.problems:
                log.warning("%s", problem)
                self.state.problems.append(problem)

    def sample_activity(self) -> bool:
        """Per-disk bytes read/written since export, current rates, connected initiators and
        snapshot fill; True if any of it changed (else there is nothing new to show or save)."""
        before = (self.state.activity, self.state.initiators, self.state.hashing, self.state.snapshot_usage)
        self.state.activity = self.meter.sample({
            nqn: (backing.path if (backing := self.state.backings.get(nqn)) else export.disk.devnode,
                  export.disk.size)
            for nqn, export in self.state.exports.items()
        })  # fmt: skip
        moved = any(a.read_rate or a.write_rate for a in self.state.activity.values())
        if moved or time.monotonic() >= self.initiators_due:
            ports = {listener.trsvcid for listener in self.state.ports}
            if self.state.iscsi.enabled:
                ports.add(ISCSI_PORT)
            self.state.initiators = stats.initiators(ports)
            self.initiators_due = time.monotonic() + INITIATOR_POLL
        self.state.hashing = self.web.hash_status(self.state) if self.web is not None else {}
        self._sample_snapshots(before[0])
        self.moving = moved or bool(self.state.initiators or self.state.hashing)
        return (self.state.activity, self.state.initiators, self.state.hashing, self.state.snapshot_usage) != before

    def _sample_snapshots(self, before: dict[str, stats.DiskActivity]) -> None:
        """A store fills only as the snapshot is written: `dmsetup status` (a fork) runs for a
        snapshot when it is new or has been written to since, not every second."""

        def written_since(nqn: str) -> bool:
            now, then = self.state.activity.get(nqn), before.get(nqn)
            return now is None or then is None or now.written_bytes != then.written_bytes

        self._refresh_snapshot_usage(written_since)

    def _refresh_snapshot_usage(self, stale: Callable[[str], bool]) -> None:
        """The fill of each snapshot exported now: what is known, unless `stale` says it
        changed; for a snapshot with no figure yet (new since the last sample: its first
        draw already says how full) its first `dmsetup status`."""
        usage = {}
        for nqn, backing in self.state.backings.items():
            if not backing.store:
                continue
            known = self.state.snapshot_usage.get(nqn)
            if known is None or stale(nqn):
                known = modes.snapshot_usage(backing.dm_name)
            if known is not None:
                usage[nqn] = known
        self.state.snapshot_usage = usage

    def publish(self) -> None:
        self._refresh_snapshot_usage(lambda nqn: False)
        self._save_state()
        if self.keys is not None and self.keys.fds():
            self.screen.set_panel(self.panel.lines(), self._overlay())
        self.screen.show(self.state, self.settings.port)
        n = len(self.state.exports)
        status = f"Exporting {n} disk{'s' if n != 1 else ''}"
        if status != self.status_sent:  # each message wakes PID 1, which shares the CPU with us
            sd_notify(STATUS=status)
            self.status_sent = status

    def _save_state(self) -> None:
        """A failed write (ENOSPC in /run, say) costs `storagetm status` its news, never the
        exports: one error until a write succeeds again, and the next publish retries."""
        try:
            self.saved_state = state.save(self.state, unless=self.saved_state)
        except OSError as exc:
            if not self.state_write_failed:
                log.error("cannot write the state file %s: %s; the exports go on, `storagetm status` shows "
                          "old news until it can (free space in /run)", exc.filename or state.STATE_FILE,
                          exc.strerror or exc)  # fmt: skip
            self.state_write_failed = True
            return
        if self.state_write_failed:
            log.info("state file written again")
        self.state_write_failed = False

    # ---- main loop ---------------------------------------------------------

    def run(self) -> int:
        previous = state.load()
        if previous is not None and previous.pid != os.getpid() and state.pid_alive(previous.pid):
            raise StorageTMError(f"storagetm is already running (pid {previous.pid})",
                                 hint="use `storagetm status` or `storagetm stop`")  # fmt: skip
        if self.root is None:
            self.root = Root(kernel.ensure_nvmet())
        if lio_loaded():  # a restart: what the last instance made on LIO is adopted in the first pass
            self.open_lio()
        devices = self.devices or BlockDevices(partition_uuids=bool(self.facts().boot_partuuid))
        devices.start()  # before enumerating, so no hotplug event is missed
        addr_sock = network.address_monitor()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        for sig in power.SIGNALS:
            signal.signal(sig, self._on_signal)
        if self.keys is None and self.screen.consoles:
            from storagetm.console.keys import KeyInput

            self.keys = KeyInput(self.screen.consoles)
        self.attach(self.root)
        assert self.reconciler is not None
        try:
            self._start(devices, previous)
            self._loop(devices, addr_sock, wake_r)
        finally:
            if self.control is not None:
                self.control.close()
            sd_notify(STOPPING="1", STATUS="Tearing down exports")
            if self.announcer is not None:
                self.announcer.withdraw()
            self.stop_web()  # first: its downloads hold the exported devices open
            self.withdraw_and_flush()
            if self.keys is not None:
                self.keys.close()
            state.STATE_FILE.unlink(missing_ok=True)
            signal.set_wakeup_fd(old_wakeup)
            addr_sock.close()
            devices.close()
            os.close(wake_r)
            os.close(wake_w)
            self.screen.close()
            log.info("stopped; nothing left exported")
            power.request(self.end)
        return ExitCode.OK

    def withdraw_and_flush(self) -> None:
        """The clean end: every export withdrawn (no initiator writes any more), then every disk
        that was exported flushed, then the screen told what happened and what follows."""
        assert self.reconciler is not None
        disks = [export.disk.devnode for export in self.state.exports.values()]
        self.wanted = {}
        self.reconciler.teardown()
        failed = power.flush_all(disks)
        self.state.exports, self.state.backings = {}, {}
        # A stop from systemd: the power button, Ctrl+Alt+Del or `systemctl poweroff` may be behind it.
        follows = self.end if self.end is not power.End.STOP else power.shutdown_under_way()
        self.screen.farewell(farewell_line(bool(disks), failed, follows))

    def _start(self, devices: BlockDevices, previous: state.RunState | None) -> None:
        assert self.reconciler is not None
        # What a killed instance made or was making: kept if still wanted, else removed.
        self.reconciler.recover()
        identity = host_identity()
        self.state.nqn_base = self.settings.nqn_base or default_nqn_base(identity)
        if not nvme_form(self.state.nqn_base):
            self.startup_problems.append(f"the NQN prefix {self.state.nqn_base!r} is not of the NVMe form "
                                         "nqn.YYYY-MM.domain[:name]: Linux initiators take it, others may "
                                         "not")  # fmt: skip
            log.warning("%s", self.startup_problems[-1])
        self.settings = settings = with_credentials(self.settings, auth.read_credential)
        self.state.auth = auth.resolve(settings.auth, settings.dhchap_secret, settings.dhchap_ctrl_secret,
                                       settings.allow_hosts, previous.auth if previous else None)  # fmt: skip
        # With both, TLS keys are made for the same host NQN the secret is for.
        self.state.tls = tls.resolve(settings.tls, settings.tls_key, self.state.auth.hosts or settings.allow_hosts,
                                     previous.tls if previous else None)  # fmt: skip
        if self.state.tls.enabled:
            tls.ensure_handshake_daemon()
        self.host = host_id(identity)
        self.state.iscsi = self.iscsi_config(self.host)
        self.ipv6 = network.ipv6_available()
        for disk in devices.enumerate() + explicit_files(self.settings):
            self.disks[disk.devnode] = disk
        # Disks first: at boot every process competes for the CPU, and what follows is for the screen.
        self.export_wanted()
        if self.lio_root is None and not self.iscsi_unavailable:  # not loaded before, so nothing of ours is on it
            self.open_lio()
            self.state.iscsi = self.iscsi_config(self.host)
            self._on_disk_events(devices)  # a disk the kernel found while modprobe ran: out now, not after the rest
        self.state.addresses = network.local_addresses()
        self.reconcile_addresses()
        self.state.secure_boot = firmware.secure_boot()
        if self.announcer is not None:
            self.state.announced = self.announcer.publish(host_id(identity))
        self.start_web(on_demand=True)
        self.publish()

    def start_web(self, host: str | None = None, *, on_demand: bool = False) -> None:
        """The web page, once the disks are exported. Not with a refused option (nothing is
        exported, nothing listens); a port that cannot be had costs the page, never the exports.
        `on_demand`: only the port is taken now; the loop makes the server at the first connection."""
        if not self.settings.web or self.settings.refusals:
            return
        from storagetm.web.listen import listen

        # The token before the first request can come in.
        self.state.web = WebConfig(self.settings.web_port, web_token(self.state.auth, self.state.tls),
                                   downloads=not self.state.tls.enabled or self.settings.web_downloads)  # fmt: skip
        try:
            listening = listen(host, self.settings.web_port)
        except OSError as exc:
            self.startup_problems.append(f"no web page: cannot listen on TCP port {self.settings.web_port}: "
                                         f"{exc.strerror}; choose another with storagetm.web_port=")  # fmt: skip
            log.warning("%s", self.startup_problems[-1])
            self.state.web = WebConfig()
            return
        self.state.web = replace(self.state.web, port=listening.getsockname()[1])
        log.info("web page on port %d", self.state.web.port)
        if on_demand:
            self.web_socket = listening
        else:
            self.serve_web(listening)

    def serve_web(self, listening: socket.socket) -> None:
        """The server on the bound socket. At the first connection (a second of CPU under TCG for
        its imports) at the normal policy; if it cannot start, the page goes, never the exports."""
        try:
            with at_normal_priority():
                from storagetm.web.server import WebServer  # http.server's imports only once the page is asked for

                server = WebServer(lambda: self.state, self.settings.web_port, io_port=self.settings.port)
                server.start(listening)
        except Exception as exc:
            self.startup_problems.append(f"no web page: its server did not start: {exc}")
            log.warning("%s", self.startup_problems[-1], exc_info=True)
            listening.close()
            self.web_socket, self.state.web = None, WebConfig()
            return
        self.web, self.web_socket = server, None

    def stop_web(self) -> None:
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self.web_socket is not None:
            self.web_socket.close()
            self.web_socket = None
        self.state.web = WebConfig()

    def _loop(self, devices: BlockDevices, addr_sock: object, wake_r: int) -> None:
        selector = selectors.DefaultSelector()
        selector.register(devices.fileno(), selectors.EVENT_READ, "udev")
        selector.register(addr_sock, selectors.EVENT_READ, "net")  # type: ignore[arg-type]
        selector.register(wake_r, selectors.EVENT_READ, "signal")
        for fd in self.keys.fds() if self.keys else []:
            selector.register(fd, selectors.EVENT_READ, "keys")
        self._listen_for_clients(selector)
        if self.web_socket is not None:
            selector.register(self.web_socket, selectors.EVENT_READ, "web")
        redraw_at: float | None = None
        addresses_changed = False  # `ip -j address` runs only after rtnetlink said so
        news = False  # a disk event or new addresses: the next tick publishes, whatever the sample says
        ready_by: float | None = time.monotonic() + READY_WAIT  # None once READY=1 is sent
        while not self.stop_requested:
            if ready_by is not None and (udev_settled() or time.monotonic() >= ready_by):
                if self._on_disk_events(devices):  # what udev sent before it emptied its queue
                    self.publish()
                sd_notify(READY="1")
                ready_by = None
                if self.settings.realtime:
                    serve_at_realtime_priority()
            if redraw_at is None and self.state.exports:
                redraw_at = time.monotonic() + self.refresh_interval()
            timeout = None if redraw_at is None else max(0.0, redraw_at - time.monotonic())
            if ready_by is not None:
                timeout = SETTLE_POLL if timeout is None else min(timeout, SETTLE_POLL)
            for key, _ in selector.select(timeout):
                if key.data == "udev":
                    if self._on_disk_events(devices):
                        news = True
                        soon = time.monotonic() + AFTER_DISK_EVENT
                        redraw_at = soon if redraw_at is None else min(redraw_at, soon)
                elif key.data == "keys":
                    assert self.keys is not None
                    pressed = self.keys.read(key.fd)
                    if key.fd not in self.keys.fds():
                        selector.unregister(key.fd)  # the console went away
                    for name in pressed:
                        self.on_key(name)
                    if pressed:
                        self.publish()
                elif key.data == "web":  # the first connection to the page: its server now takes the socket
                    selector.unregister(key.fd)
                    assert self.web_socket is not None
                    self.serve_web(self.web_socket)
                    if self.web is None:  # it did not start: the screen says so now, not at the next change
                        self.publish()
                elif key.data == "control":
                    assert self.control is not None
                    self.control.ready(key.fd, self)
                elif key.data == "net":
                    network.drain(addr_sock)  # type: ignore[arg-type]
                    addresses_changed = news = True
                    redraw_at = redraw_at or time.monotonic() + REDRAW_DEBOUNCE
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 64)
            if redraw_at is not None and time.monotonic() >= redraw_at:
                redraw_at = None
                if addresses_changed:
                    addresses_changed = False
                    self.state.addresses = network.local_addresses()
                    self.reconcile_addresses()
                # Nothing new (no I/O, the same initiators): no redraw, no state file, no JSON.
                if self.sample_activity() or news:
                    self.publish()
                news = False
        selector.close()

    def refresh_interval(self) -> float:
        """The dashboard samples every second; without one, an idle target samples less often."""
        return DASHBOARD_REFRESH if self.screen.terminal or self.moving else IDLE_REFRESH

    def _listen_for_clients(self, selector: selectors.BaseSelector) -> None:
        """The control socket, once the disks are out; without it `storagetm FILE…` starts an engine
        of its own, which finds this one running and says so."""
        self.control = self.control or ControlServer()
        try:
            self.control.start(selector)
        except OSError as exc:
            log.warning("no control socket %s: %s; `storagetm FILE…` cannot hand its files over",
                        self.control.path, exc.strerror or exc)  # fmt: skip
            self.control = None

    def _on_disk_events(self, devices: BlockDevices) -> bool:
        """Export what the events call for; True if the set of disks changed (the caller
        has the screen redrawn)."""
        changed = seen = False
        for event in devices.events():
            log.debug("udev %s %s", event.action, event.disk.devnode)
            seen = True
            if event.action == "remove":
                changed |= self.disks.pop(event.disk.devnode, None) is not None
            else:
                changed |= self.disks.get(event.disk.devnode) != event.disk
                self.disks[event.disk.devnode] = event.disk
        # A disk refused as in use is looked at again on any event: an unmount changes no udev property.
        if changed or (seen and self.in_use_refused):
            self.export_wanted()
            changed = True
        return changed

    # ---- the control panel: keys on the target's own keyboard -------------------

    def panel_disks(self) -> list[panel.DiskChoice]:
        """The exported disks in the screen's order, as the keys 1-9 pick them."""
        exports = sorted(self.state.exports.values(), key=lambda e: e.disk.name)
        return [panel.DiskChoice(e.nqn, e.disk.name, e.mode) for e in exports]

    def on_key(self, key: str) -> None:
        for command in self.panel.handle(key, self.panel_disks(), self.state.auth.enabled):
            if isinstance(command, panel.SetMode):
                chosen = self.wanted.get(command.nqn or "")
                self.set_modes(command.mode, None if command.nqn is None else [command.nqn])
                what = chosen.disk.name if chosen else "every disk"
                now = self.state.exports.get(command.nqn or "")
                if now is not None and now.mode is not command.mode:  # a bad mode option keeps it read-only
                    self.panel.note = f"{what} stays {now.mode.label} (a bad mode option); m: every disk's mode."
                else:
                    self.panel.note = f"{what} is now {command.mode.label}."
            elif isinstance(command, panel.SetAuth):
                self.panel.note = self.set_auth(command.on)
            else:
                self.stop(command.end)

    def _overlay(self) -> list[str] | None:
        if self.panel.stage is panel.Stage.QR:
            text = self.connection_text(self.state, self.settings.port)
            if self.qr_drawn[0] != text:  # qrencode runs once per text, not at every redraw
                self.qr_drawn = (text, qr.render(text))
            return [*self.qr_drawn[1], "The connection details, for a phone's camera. Any key: back."]
        return self.panel.overlay

    def set_modes(self, mode: modes.Mode, nqns: Iterable[str] | None = None) -> None:
        """Every disk (or the exports `nqns`) in `mode` from now on, also for disks that come
        later (all) or come back (one), through the one reconciler: the namespace is
        withdrawn from the old backing, then offered on the new. Each disk is flushed once
        the old namespace is gone: every write the initiator saw complete is then on the
        disk, and any write after it failed or goes to the new backing."""
        if nqns is None:
            self.settings = replace(self.settings, mode=mode, disk_modes=(), mode_unsure=False)
        else:
            chosen = tuple((self.wanted[nqn].disk.devnode, mode) for nqn in nqns if nqn in self.wanted)
            self.settings = replace(self.settings, disk_modes=chosen + self.settings.disk_modes)
        disks = [export.disk.devnode for export in self.state.exports.values()]
        self.export_wanted()
        power.flush_all(disks)
        self.publish()

    def set_auth(self, on: bool) -> str:
        """Authentication on (a new secret and host NQN, shown on the screen) or off; the
        exports follow through the reconciler. What happened, for the screen."""
        if self.state.tls.enabled:
            return "Authentication stays as booted while TLS is on (its keys are for that host NQN)."
        if on:
            hosts = self.settings.allow_hosts or (auth.generated_host_nqn(),)
            # Bidirectional as asked at boot: the controller secret is new too, like the host's.
            ctrl_secret = auth.generate_secret() if self.settings.dhchap_ctrl_secret else ""
            self.state.auth = AuthConfig(auth.generate_secret(), ctrl_secret, hosts)
        else:
            self.state.auth = AuthConfig()
        if self.state.web.port:  # its downloads read the whole disk: the page asks for what the disks do
            self.state.web = replace(self.state.web, token=web_token(self.state.auth, self.state.tls))
        self.state.iscsi = self.iscsi_config(self.host)
        self.reconcile_addresses()
        log.info("authentication turned %s from the keyboard", "on" if on else "off")
        return "Authentication is on: connect with the new line above." if on else \
            "Authentication is off: anyone on the network can connect."  # fmt: skip

    # ---- disks and files handed over by `storagetm FILE…` (control.py) ------------------

    def export_handed(self, client: int, specs: Sequence[str]) -> tuple[int, str, list[str]]:
        """Export `specs` for `client` through the one reconciler, all or nothing; (0, the
        screen of these exports, the log lines) or (exit code, "", [why, one line])."""
        if self.settings.identity_overrides() != self.settings.nvme.shared():
            return ExitCode.USAGE, "", ["the running storagetm gives its one disk $SYSTEMD_NVME_SERIAL/UUID; "
                                        "`storagetm stop` it to export more"]  # fmt: skip
        named: list[str] = []
        files: list[Disk] = []
        try:
            for spec in specs:
                real = resolve_file(spec)
                named.append(real or spec)
                if real is not None and real not in self.disks:
                    files.append(disk_from_file(real))
        except (UsageError, OSError) as exc:
            return ExitCode.USAGE, "", [exc.one_line() if isinstance(exc, UsageError) else f"{exc}"]
        for disk in files:
            self.disks[disk.devnode] = disk
        self.handed[client] = tuple(named)
        trial = self._plan()  # pure: nothing is exported unless every spec is
        missing = [spec for spec in named if not any(e.disk.matches(spec) for e in trial.exports.values())]
        if missing:
            self._forget_handed(client)
            return ExitCode.FAILURE, "", [handed_refusal(missing[0], trial)]
        self.export_wanted()
        mine = {nqn: e for nqn, e in self.state.exports.items() if any(e.disk.matches(spec) for spec in named)}
        if not all(any(e.disk.matches(spec) for e in mine.values()) for spec in named):
            failed = [problem for problem in self.state.problems if problem not in trial.problems]
            self._forget_handed(client)
            self.export_wanted()
            return ExitCode.FAILURE, "", [failed[0] if failed else f"could not export {', '.join(named)}"]
        self.publish()
        shown = replace(self.state, exports=mine, not_exported=[], problems=[]).without_secrets()
        lines = [f"exported {e.disk.devnode} ({e.mode.label}) as {nqn}" for nqn, e in sorted(mine.items())]
        return ExitCode.OK, render(shown, self.settings.port), lines

    def withdraw_handed(self, client: int) -> tuple[str, list[str]]:
        """The client ended: what only it wanted is withdrawn, then flushed, as at a stop."""
        if client not in self.handed:
            return "", []
        before = dict(self.state.exports)
        self._forget_handed(client)
        self.export_wanted()
        gone = {nqn: e for nqn, e in before.items() if nqn not in self.state.exports}
        failed = power.flush_all([e.disk.devnode for e in gone.values()])
        self.publish()
        lines = [f"withdrew {nqn} ({e.disk.devnode})" for nqn, e in sorted(gone.items())]
        if not gone:  # the running storagetm exports them anyway (--all, or named at its start)
            return "Stopping: nothing withdrawn; the running storagetm goes on exporting them.", lines
        return farewell_line(True, failed, power.End.STOP), lines

    def _forget_handed(self, client: int) -> None:
        specs = self.handed.pop(client, ())
        still = set(self.selection().devices)
        for spec in specs:
            disk = self.disks.get(spec)
            if disk is not None and disk.is_file and spec not in still:
                del self.disks[spec]

    def _on_signal(self, signum: int, _frame: object) -> None:
        end = power.SIGNALS.get(signum, power.End.STOP)
        log.info("received %s, stopping%s", signal.strsignal(signum), f" and {end.doing}" if end.doing else "")
        self.stop(end)

    def stop(self, end: power.End = power.End.STOP) -> None:
        """End the main loop; `end` (power off, reboot) follows the teardown. A power-off or
        reboot asked for once is not undone by a plain stop after it."""
        self.stop_requested = True
        if end is not power.End.STOP:
            self.end = end


def _backing_key(export: Export | None) -> tuple[str, int, int, modes.Mode, int] | None:
    return None if export is None else export.backing_key


def announcement() -> Announcer:
    from storagetm.system.announce import Announcer

    return Announcer()


def handed_refusal(spec: str, result: Plan) -> str:
    """Why a disk or file handed over is not exported, one line."""
    for disk, reason in result.not_exported:
        if disk.matches(spec):
            return refusal(disk, reason, result.details.get(disk.devnode, ""))
    for problem in result.problems:
        if spec in problem and not problem.startswith("no disk matches"):
            return problem
    return f"no disk matches {spec!r}: name an image file, a block device, its by-id name or serial"


def farewell_line(exported: bool, failed: list[str], follows: power.End) -> str:
    """The screen's last line: what was done to the disks, and what comes now."""
    line = "Stopping: exports withdrawn"
    if failed:
        line += f", NOT FLUSHED: {'; '.join(failed)}"
    elif exported:
        line += ", disks flushed"
    return f"{line} - {follows.doing}" if follows.doing else f"{line}."
