"""Which disks to export, and why not the others: the export policy applied to the disks
known now and the settings. Pure but for what `held` and the facts report; the daemon
hands its result to the reconciler, `--list-devices` prints it."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

from msgspec import Struct, field

from storagetm.config.settings import Settings
from storagetm.disks.disk import Disk, disk_from_file, sort_disks
from storagetm.disks.identity import identity_for
from storagetm.disks.policy import Reason, SystemFacts, awaiting_names, exclusion, nothing_held, usage
from storagetm.model import Export


class Plan(Struct, frozen=True):
    """The outcome of the export policy for the current set of block devices."""

    exports: dict[str, Export]
    not_exported: list[tuple[Disk, Reason]]
    problems: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)  # device node -> how it is in use

    def why(self, disk: Disk, reason: Reason) -> str:
        """The reason as shown: for a disk in use, how ("mounted at /home")."""
        return self.details.get(disk.devnode, reason.value)


def plan(
    disks: list[Disk],
    settings: Settings,
    facts: SystemFacts,
    nqn_base: str,
    *,
    exported: Collection[str] = (),
    held: Callable[[str], str] = nothing_held,
) -> Plan:
    """`exported`: device nodes exported now; they stay so even if the system has since mounted
    them (withdrawing would fail the initiator's I/O), and our own dm-snapshot holds them.
    `held`: tells whether another program has a disk to itself (policy.held_by_another)."""
    exports: dict[str, Export] = {}
    skipped: list[tuple[Disk, Reason]] = []
    problems: list[str] = []
    details: dict[str, str] = {}
    unknown_root_refused = False
    overrides = settings.identity_overrides()
    specs = (*settings.devices, *(spec for spec, _ in settings.disk_modes))
    for disk in sort_disks(disks):
        named = any(disk.matches(spec) for spec in settings.devices)
        selected = settings.all_disks or named
        reason = exclusion(disk, facts, lift_guards=settings.lift_guards)
        if reason is None and awaiting_names(disk, specs):
            skipped.append((disk, Reason.AWAITING_NAMES))  # for a moment: udev's event follows
            continue
        if reason is None and not selected:
            reason = Reason.NOT_SELECTED
        if reason is None and facts.root_unknown and not (named or disk.is_file or settings.lift_guards):
            reason = Reason.ROOT_UNKNOWN
            unknown_root_refused = True
        if reason is None and settings.refusals:
            reason = Reason.BAD_OPTION
        if reason is None and disk.devnode not in exported and (use := usage(disk, facts, held)):
            if settings.lift_guards:
                problems.append(f"exporting {disk.devnode} although it is {use}: --all was given twice")
            else:
                reason = Reason.IN_USE
                details[disk.devnode] = use
        if reason is not None:
            # Partitions and virtual devices (our own dm/zram among them) would only clutter the screen.
            if reason not in (Reason.PARTITION, Reason.VIRTUAL) or named:
                skipped.append((disk, reason))
            if selected and not settings.all_disks:
                problems.append(refusal(disk, reason, details.get(disk.devnode, "")))
            continue
        identity = identity_for(nqn_base, disk, overrides)
        if identity.nqn in exports:
            problems.append(f"not exporting {disk.devnode}: same identity as "
                            f"{exports[identity.nqn].disk.devnode}")  # fmt: skip
            continue
        exports[identity.nqn] = Export(disk, identity, settings.mode_for(disk), settings.snapshot_size)
    if unknown_root_refused:
        problems.insert(0, f"{facts.root_unknown}; not exporting any disk: name the disks to export, "
                           "or give --all twice")  # fmt: skip
    for spec in settings.devices:
        if not any(disk.matches(spec) for disk in disks):
            problems.append(f"no disk matches {spec!r} (yet); it is exported if it appears")
    for spec, mode in dict(reversed(settings.disk_modes)).items():  # the first mode given for a disk counts
        if not any(disk.matches(spec) for disk in disks):
            problems.append(f"no disk matches {spec!r} of the mode option (yet); it is {mode.label} if it appears")
    return Plan(exports, skipped, problems, details)


def refusal(disk: Disk, reason: Reason, detail: str) -> str:
    """One line for a disk the user named that is not exported."""
    if reason is Reason.IN_USE:
        return f"not exporting {disk.devnode}: {detail}; stop using it first, or give --all twice (exports every disk)"
    return f"not exporting {disk.devnode}: {reason.value}"


def explicit_files(settings: Settings) -> list[Disk]:
    """DEVICE arguments that are regular files, exported through nvmet's file backend."""
    return [disk_from_file(spec) for spec in settings.devices if Path(spec).is_file()]
