"""The device each export is offered on: the disk itself (read-write), or a
device-mapper device over it (read-only, snapshot), with the loop devices and the RAM
store those need. Its objects go through the reconciler like a fabric's."""
