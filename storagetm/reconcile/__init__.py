"""Desired state against what the kernel holds: one loop for every object and every fabric.

`objects` defines the value a desired state is made of, `plan` the pure difference
between desired and owned objects, `journal` the ownership record written ahead of every
change, and `reconciler` the one `apply(desired)` that start, hotplug, run-time changes,
crash adoption and teardown all go through.
"""
