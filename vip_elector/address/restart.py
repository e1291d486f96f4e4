"""The unit's ExecStopPost=: is a restart coming? (SPEC §12)

A crash that systemd restarts keeps the address (the new daemon resumes the
session and with it the claim); a daemon that ends for good leaves none.
Only systemd knows which it is: its environment for ExecStopPost= says.
"""

from __future__ import annotations

from typing import Optional


def restart_coming(env) -> Optional[str]:
    """Why systemd will start the daemon again right away (keep the VIP), or None (drop it).

    systemd gives ExecStopPost= ``SERVICE_RESULT``, ``EXIT_CODE`` and
    ``EXIT_STATUS``. With ``Restart=on-failure`` a result other than
    ``success`` is restarted, and so is death by SIGHUP (clean for systemd,
    but ``RestartForceExitStatus=SIGHUP``); exit 2 and 78 are not
    (``RestartPreventExitStatus=``). A failure that will not be restarted
    (the start limit, a stop that timed out) puts the unit in the failed
    state: ``OnFailure=`` then runs ``vip-elector-drop-vip@``, which drops it.
    Outside ExecStopPost= (no ``SERVICE_RESULT``): None, drop it.
    """
    result = env.get("SERVICE_RESULT")
    if not result:
        return None
    code, status = env.get("EXIT_CODE", ""), env.get("EXIT_STATUS", "")
    if code == "killed" and status in ("HUP", "SIGHUP", "1"):
        return "the daemon died of SIGHUP (a reload gone wrong): systemd restarts it"
    if result == "success":
        return None
    if code == "exited" and status in ("2", "78"):
        return None
    return (f"the daemon ended with {result} ({code or '?'} {status or '?'}): systemd restarts "
            "it and it resumes its session; if it does not, OnFailure= drops the VIP")
