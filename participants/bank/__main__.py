"""``python -m accord.participants.bank``: the ``accord participant bank`` command, with the
same options and exit codes (it needs the ``tools`` extra: the command line is there)."""

from accord.tools.cli import bank_main

bank_main()
