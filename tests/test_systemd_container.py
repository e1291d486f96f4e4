"""vip-elector.service under a real systemd 252, in a booted bookworm container.

One container for the module (tests/container.py), the unit and the code of
this checkout installed by hand the way the package lays them out, and the
`consul` dev agent of conftest.py on the host, which the container reaches on
127.0.0.1 (shared network). The tests run in file order and follow one
node's life:

  unconfigured: the unit is skipped, not failed, and `systemctl status` says why
  configured:   `systemctl start` returns after READY=1, status tells the role,
                the journal has the fields, the MESSAGE_IDs and the catalog text
  hung:         SIGSTOP → the watchdog kills it, systemd restarts it within
                RestartSec, it resumes its session: the key untouched
  reloaded:     `systemctl reload` with a broken configuration keeps it
                running and leading, STATUS names the file; fixed, it reloads
  stopped:      the key is handed over (deleted), the unit ends inactive, status 0
  misconfigured: exit 78, failed, not restarted, the error in the journal at err

Each test sets up what it needs from the state before it, so a failure in one
shows as that one failing (the others may then fail too: read the first).
"""

import json
import os
import re
import subprocess

import pytest

from helpers import wait_for
from package_steps import key_untouched

pytestmark = [pytest.mark.container, pytest.mark.consul]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = 'vip-elector.service'
NAME = 'node-ct'
# Consul here runs without ACLs and ignores it; what counts is that the
# sandboxed daemon can read a root:vip-elector 0640 file and never logs it.
TOKEN = 'c0ffee00-5ec2-e7ed-70ce-' + os.urandom(6).hex()
MSG_ACQUIRED = '5167235c50a3439b965b74c3cb0102bc'
MSG_LOST = '4da94490216148db9573bb18f3304344'
MSG_RELEASED = '071fe3546e774ce5958b0e1e1225c17d'
MSG_CONFIG = 'b412abd43a9d4152985b34a87c6792f8'
MSG_WAITING = 'edd16525a7864980935487e3010dfb57'
ALL_IDS = (MSG_ACQUIRED, MSG_LOST, MSG_RELEASED, MSG_CONFIG, MSG_WAITING)

WRAPPER = '''#!/usr/bin/python3
import sys
from vip_elector.cli import main
sys.exit(main())
'''
# A shorter watchdog for the hung-daemon test only (the shipped 30 s would
# make it wait 30 s); the daemon pings at half of whatever it is given.
FAST_WATCHDOG = '[Service]\nWatchdogSec=4s\n'
DROPIN = '/etc/systemd/system/vip-elector.service.d/test-watchdog.conf'


@pytest.fixture(scope='module')
def ct(request):
    from container import container_fixture
    yield from container_fixture(request)


@pytest.fixture(scope='module')
def key():
    return f'service/systemd-ct-{os.getpid()}/leader'


@pytest.fixture(scope='module')
def installed(ct, consul, key):
    """The unit, catalog, code and user installed by hand, as the package does;
    enabled; /etc/vip-manager.yml NOT written yet (the unconfigured node)."""
    ct.copy_in(os.path.join(REPO, 'vip_elector'), '/usr/lib/python3/dist-packages/vip_elector')
    ct.put('/usr/bin/vip-elector', WRAPPER, mode=0o755)
    ct.copy_in(os.path.join(REPO, 'systemd', 'vip-elector.service'), f'/usr/lib/systemd/system/{UNIT}')
    ct.copy_in(os.path.join(REPO, 'systemd', 'vip-elector.catalog'),
               '/usr/lib/systemd/catalog/vip-elector.catalog')
    ct.run(['adduser', '--system', '--group', '--home', '/nonexistent', '--no-create-home',
            '--quiet', 'vip-elector'])
    ct.put('/etc/default/vip-elector',
           f'VIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager.yml --hostname={NAME} '
           '--token-file=/etc/vip-elector/token"\n'
           '#CONSUL_HTTP_TOKEN=\n', mode=0o640, owner='root', group='vip-elector')
    ct.put('/etc/vip-elector/token', TOKEN + '\n', mode=0o640, owner='root', group='vip-elector')
    ct.run(['journalctl', '--update-catalog'])
    ct.systemctl('daemon-reload')
    ct.systemctl('enable', UNIT)
    return ct


def configure(ct, consul, key, dcs_type='consul'):
    ct.put('/etc/vip-manager.yml',
           f'dcs-type: {dcs_type}\ndcs-endpoints: ["{consul.url}"]\ntrigger-key: {key}\n'
           'ip: 10.0.0.10\nnetmask: 24\ninterface: eth0\n', mode=0o644)


def props(ct, *names):
    return ct.show(UNIT, *names)


def journal_entries(ct, *args):
    """journalctl -o json entries (dicts) of the unit's log."""
    out = ct.journal('-u', UNIT, '-o', 'json', *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def this_run(ct):
    """journalctl match for what the unit's latest start logged."""
    return '_SYSTEMD_INVOCATION_ID=' + props(ct, 'InvocationID')['InvocationID']


def held_by(consul, key, name):
    """(value, session) while `name` holds the key with a session, else None."""
    entry = consul.kv_get(key)
    if entry and entry['Value'].decode() == name and entry.get('Session'):
        return name, entry['Session']
    return None


def test_shipped_unit_exposure_at_most_1_1(tmp_path):
    """systemd-analyze security --offline on the host: the file as shipped."""
    res = subprocess.run(['systemd-analyze', 'security', '--offline=true', '--no-pager',
                          os.path.join(REPO, 'systemd', UNIT)],
                         capture_output=True, text=True)
    score = _exposure(res.stdout + res.stderr)
    print(f'offline exposure: {score}')
    assert score <= 1.1


def _exposure(text):
    m = re.search(r'Overall exposure level for \S+: (\d+\.\d+)', text)
    assert m, text
    return float(m.group(1))


def test_unconfigured_node_is_skipped_and_says_why(installed, consul, key):
    ct = installed
    assert props(ct, 'UnitFileState')['UnitFileState'] == 'enabled'
    ct.systemctl('start', UNIT)          # a skipped start is not an error
    p = props(ct, 'ActiveState', 'Result', 'NRestarts', 'ConditionResult')
    assert p['ActiveState'] == 'inactive', p
    assert p['NRestarts'] == '0', p
    status = ct.systemctl('status', UNIT, check=False).stdout
    assert 'not starting: /etc/vip-manager.yml (--vip-manager-config in /etc/default/vip-elector) ' \
        'does not exist' in status, status
    assert consul.kv_get(key) is None


@pytest.mark.parametrize('opts, reason', [
    ('--hostname=x --vip-manager-config /etc/vip-manager-alt.yml',
     'not starting: /etc/vip-manager-alt.yml (--vip-manager-config in /etc/default/vip-elector) '
     'does not exist'),
    ('--hostname=x', 'not starting: VIP_ELECTOR_OPTS in /etc/default/vip-elector has no '
                     '--vip-manager-config'),
])
def test_condition_reads_the_path_from_vip_elector_opts(installed, opts, reason):
    """The condition follows VIP_ELECTOR_OPTS (both --flag=value and --flag value)."""
    ct = installed
    shipped = ct.read('/etc/default/vip-elector')
    ct.put('/etc/default/vip-elector', f'VIP_ELECTOR_OPTS="{opts}"\n', mode=0o640, group='vip-elector')
    try:
        ct.put('/etc/vip-manager.yml', 'dcs-type: consul\n')   # present, but not the one named
        ct.systemctl('start', UNIT)
        assert props(ct, 'ActiveState')['ActiveState'] == 'inactive'
        assert reason in ct.systemctl('status', UNIT, check=False).stdout
        if 'alt' in opts:    # and it is that file that counts
            ct.put('/etc/vip-manager-alt.yml', 'dcs-type: etcd\n')
            ct.systemctl('start', UNIT, check=False)
            assert props(ct, 'ExecMainStatus')['ExecMainStatus'] == '78'
            ct.systemctl('reset-failed', UNIT)
    finally:
        ct.run(['rm', '-f', '/etc/vip-manager.yml', '/etc/vip-manager-alt.yml'])
        ct.put('/etc/default/vip-elector', shipped, mode=0o640, group='vip-elector')


def test_start_returns_after_ready_and_status_tells_the_role(installed, consul, key):
    ct = installed
    configure(ct, consul, key)
    ct.systemctl('start', UNIT)
    # Type=notify: `systemctl start` returned, so READY=1 has arrived.
    p = props(ct, 'ActiveState', 'SubState', 'StatusText', 'MainPID', 'WatchdogUSec', 'User')
    assert p['ActiveState'] == 'active', p
    assert p['StatusText'], p
    assert p['WatchdogUSec'] == '30s', 'the shipped watchdog'
    wait_for(lambda: held_by(consul, key, NAME), 20, message=f'{NAME} to hold {key}')
    wait_for(lambda: props(ct, 'StatusText')['StatusText'] == f'leader: holding {key} as {NAME}',
             10, message='the leader status')
    assert ct.run(['ps', '-o', 'user=', '-p', p['MainPID']]).stdout.strip() == 'vip-elector'


def test_journal_has_identifier_fields_message_id_and_catalog(installed, consul, key):
    ct = installed
    value, session = wait_for(lambda: held_by(consul, key, NAME), 20, message=f'{NAME} to hold {key}')
    entries = journal_entries(ct, this_run(ct))
    own = [e for e in entries if e.get('SYSLOG_IDENTIFIER') == 'vip-elector'
           and e.get('_COMM') != 'sh' and 'VIP_ELECTOR_ROLE' in e]
    assert own, entries
    acquired = [e for e in own if e.get('MESSAGE_ID') == MSG_ACQUIRED]
    assert len(acquired) == 1, own
    a = acquired[0]
    assert 'LOCK ACQUIRED' in a['MESSAGE']
    assert (a['VIP_ELECTOR_ROLE'], a['VIP_ELECTOR_KEY'], a['VIP_ELECTOR_VALUE'],
            a['VIP_ELECTOR_SESSION']) == ('leader', key, NAME, session), a
    assert a['PRIORITY'] in ('5', '6'), a            # notice or info
    for e in own:
        assert e['VIP_ELECTOR_KEY'] == key and e['VIP_ELECTOR_VALUE'] == NAME, e
    verbose = ct.journal('-u', UNIT, '-o', 'verbose')
    for field in ('SYSLOG_IDENTIFIER=vip-elector', f'MESSAGE_ID={MSG_ACQUIRED}',
                  'VIP_ELECTOR_ROLE=leader', f'VIP_ELECTOR_KEY={key}',
                  f'VIP_ELECTOR_VALUE={NAME}', f'VIP_ELECTOR_SESSION={session}'):
        assert field in verbose, field
    assert TOKEN not in ct.journal('-o', 'verbose')
    # The catalog: compiled, all five IDs, and its text under the message.
    listed = ct.journal('--list-catalog', *ALL_IDS)
    for mid in ALL_IDS:
        assert mid in listed, listed
    explained = ct.journal('-x', '-u', UNIT, f'MESSAGE_ID={MSG_ACQUIRED}')
    assert f'Subject: this node now holds the VIP key {key}' in explained, explained
    assert session in explained, 'the catalog fills in the session'
    assert 'Documentation: man:vip-elector(8)' in explained


def test_hung_daemon_is_killed_by_the_watchdog_restarted_and_resumes(installed, consul, key):
    """SPEC §8.4: killed by the watchdog, restarted after RestartSec (1 s),
    the daemon resumes its session from $RUNTIME_DIRECTORY long before the
    session could expire: the key keeps its session and ModifyIndex."""
    ct = installed
    ct.put(DROPIN, FAST_WATCHDOG)
    ct.systemctl('daemon-reload')
    ct.systemctl('restart', UNIT)
    wait_for(lambda: held_by(consul, key, NAME), 20, message=f'{NAME} to hold {key}')
    wait_for(lambda: props(ct, 'StatusText')['StatusText'] == f'leader: holding {key} as {NAME}',
             10, message='the leader status')
    p = props(ct, 'MainPID', 'NRestarts', 'WatchdogUSec')
    assert p['WatchdogUSec'] == '4s' and p['MainPID'] != '0', p
    assert ct.run(['stat', '-c', '%U %a', '/run/vip-elector']).stdout.split() == ['vip-elector', '700']
    restarts = int(p['NRestarts'])
    with key_untouched(consul, key):
        ct.run(['kill', '-STOP', p['MainPID']])
        wait_for(lambda: int(props(ct, 'NRestarts')['NRestarts']) == restarts + 1, 30,
                 message='the watchdog to kill the stopped daemon and systemd to restart it')
        assert any('Watchdog timeout' in e.get('MESSAGE', '') for e in journal_entries(ct))
        wait_for(lambda: props(ct, 'ActiveState')['ActiveState'] == 'active', 20, message='active again')
        new_pid = props(ct, 'MainPID')['MainPID']
        assert new_pid not in ('0', p['MainPID'])
        wait_for(lambda: props(ct, 'StatusText')['StatusText'] == f'leader: holding {key} as {NAME}',
                 10, message='the leader status after the restart')
    # The restarted daemon keeps pinging: no second watchdog kill while it leads.
    ct.run(['rm', DROPIN])
    ct.systemctl('daemon-reload')


def test_reload_with_a_broken_configuration_keeps_leading(installed, consul, key):
    """SPEC §8.3: a reload that finds the configuration broken keeps the
    daemon running as before, the key untouched, and STATUS names the file;
    once fixed, the next reload applies it."""
    ct = installed
    if props(ct, 'ActiveState')['ActiveState'] != 'active':
        ct.systemctl('start', UNIT)
    wait_for(lambda: held_by(consul, key, NAME), 45, message=f'{NAME} to hold {key}')
    good = ct.read('/etc/vip-manager.yml')
    pid = props(ct, 'MainPID')['MainPID']
    with key_untouched(consul, key):
        ct.put('/etc/vip-manager.yml', 'dcs-type: consul\ntrigger-key: [broken\n')
        try:
            ct.systemctl('reload', UNIT, check=False)
            wait_for(lambda: '/etc/vip-manager.yml' in props(ct, 'StatusText')['StatusText'], 15,
                     message='STATUS to name the broken file')
            p = props(ct, 'ActiveState', 'MainPID')
            assert p == {'ActiveState': 'active', 'MainPID': pid}, p
        finally:
            ct.put('/etc/vip-manager.yml', good)
        ct.systemctl('reload', UNIT)
        wait_for(lambda: props(ct, 'StatusText')['StatusText'] == f'leader: holding {key} as {NAME}',
                 15, message='the leader status after the good reload')
        assert props(ct, 'MainPID')['MainPID'] == pid


def scrape(port):
    """The text at http://127.0.0.1:PORT/metrics (the container shares the host's network), or None."""
    import urllib.request
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f'http://127.0.0.1:{port}/metrics', timeout=3) as r:
            return r.read().decode()
    except OSError:
        return None


def test_metrics_are_served_from_the_sandbox_and_through_reloads(installed, consul, key):
    """SPEC §11.6: --metrics-address added by a reload (the unit's ExecReload= hands the new
    VIP_ELECTOR_OPTS over) is served by the sandboxed daemon, and still after a second
    reload (re-execution: the same port bound again); removed, the port is closed. The
    key is untouched throughout."""
    from consul_agent import free_ports
    ct = installed
    if props(ct, 'ActiveState')['ActiveState'] != 'active':
        ct.systemctl('start', UNIT)
    wait_for(lambda: held_by(consul, key, NAME), 45, message=f'{NAME} to hold {key}')
    wait_for(lambda: props(ct, 'StatusText')['StatusText'] == f'leader: holding {key} as {NAME}',
             15, message='the leader status')
    shipped = ct.read('/etc/default/vip-elector')
    (port,) = free_ports(1)
    pid = props(ct, 'MainPID')['MainPID']
    leading = 'vip_elector_leader 1.0'
    with key_untouched(consul, key):
        try:
            ct.put('/etc/default/vip-elector', shipped.replace(
                '--token-file=', f'--metrics-address=127.0.0.1:{port} --token-file=', 1),
                mode=0o640, group='vip-elector')
            ct.systemctl('reload', UNIT)
            wait_for(lambda: leading in (scrape(port) or ''), 15, message='the leader gauge at 1')
            text = scrape(port)
            assert f'vip_elector_info{{key="{key}",value="{NAME}",version=' in text, text
            assert 'process_resident_memory_bytes' in text, 'process_* under ProcSubset=pid too'
            started = re.search(r'^process_start_time_seconds (\S+)$', text, re.M).group(1)
            ct.systemctl('reload', UNIT)
            wait_for(lambda: leading in (scrape(port) or ''), 15, message='served after a second reload')
            again = re.search(r'^process_start_time_seconds (\S+)$', scrape(port), re.M).group(1)
            assert float(again) > float(started), 'a reload is a new program: a new start time'
            assert props(ct, 'MainPID')['MainPID'] == pid, 'reloads re-execute in place'
            assert 'trying again' not in ct.journal('-u', UNIT, this_run(ct))
        finally:
            ct.put('/etc/default/vip-elector', shipped, mode=0o640, group='vip-elector')
        ct.systemctl('reload', UNIT)
        wait_for(lambda: scrape(port) is None, 15, message='the port closed once the flag is gone')
        wait_for(lambda: props(ct, 'StatusText')['StatusText'] == f'leader: holding {key} as {NAME}',
                 15, message='the leader status after the last reload')


def test_waiting_and_lost_are_explained_in_the_journal(installed, consul, key):
    """--check-id: waiting while the check is missing, leader when it passes,
    LOCK LOST when it fails; each event with its MESSAGE_ID and catalog text."""
    ct = installed
    check = 'vip-ct-check'
    shipped = ct.read('/etc/default/vip-elector')
    ct.systemctl('stop', UNIT)
    ct.put('/etc/default/vip-elector', shipped.replace(f'--hostname={NAME}',
                                                       f'--hostname={NAME} --check-id={check}'),
           mode=0o640, group='vip-elector')
    try:
        ct.systemctl('start', UNIT)
        status = lambda: props(ct, 'StatusText')['StatusText']  # noqa: E731
        wait_for(lambda: status().startswith(f"waiting: check '{check}' is not registered"), 10,
                 message='the waiting status')
        run = this_run(ct)
        consul.register_ttl_check(check)
        wait_for(lambda: held_by(consul, key, NAME), 15, message=f'{NAME} to lead once {check} passes')
        consul.fail_check(check)
        wait_for(lambda: status() == f"waiting: check '{check}' is critical", 15,
                 message='the waiting status once the check fails')
        assert not held_by(consul, key, NAME)
        entries = journal_entries(ct, run)
        by_id = {mid: [e for e in entries if e.get('MESSAGE_ID') == mid]
                 for mid in (MSG_WAITING, MSG_ACQUIRED, MSG_LOST)}
        assert all(by_id.values()), by_id
        # Each line carries the role it leads to (as LOCK ACQUIRED carries leader).
        assert by_id[MSG_WAITING][0]['VIP_ELECTOR_ROLE'] == 'waiting', by_id[MSG_WAITING][0]
        assert by_id[MSG_LOST][0]['VIP_ELECTOR_ROLE'] in ('follower', 'waiting'), by_id[MSG_LOST][0]
        assert check in by_id[MSG_WAITING][0]['MESSAGE']
        assert 'LOCK LOST' in by_id[MSG_LOST][0]['MESSAGE']
        assert by_id[MSG_LOST][0]['PRIORITY'] in ('3', '4'), by_id[MSG_LOST][0]
        explained = ct.journal('-x', '-u', UNIT, run)
        assert f'Subject: this node lost the VIP key {key}' in explained, explained
        assert "Subject: waiting for this node's health check to pass" in explained, explained
    finally:
        ct.systemctl('stop', UNIT, check=False)
        ct.put('/etc/default/vip-elector', shipped, mode=0o640, group='vip-elector')
        consul.deregister_check(check)


def test_stop_hands_over_and_ends_clean(installed, consul, key):
    ct = installed
    if props(ct, 'ActiveState')['ActiveState'] != 'active':
        ct.systemctl('start', UNIT)
    wait_for(lambda: held_by(consul, key, NAME), 45, message=f'{NAME} to hold {key}')
    ct.systemctl('stop', UNIT)
    assert consul.kv_get(key) is None, 'a planned stop deletes the key at once'
    p = props(ct, 'ActiveState', 'Result', 'ExecMainStatus', 'ExecMainCode', 'StatusText')
    assert (p['ActiveState'], p['Result'], p['ExecMainStatus']) == ('inactive', 'success', '0'), p
    # The last word (issue 10, point 5): never a stale "leader: holding …" after the exit.
    assert p['StatusText'] in ('', 'stopped'), p
    released = [e for e in journal_entries(ct) if e.get('MESSAGE_ID') == MSG_RELEASED]
    assert released and 'LOCK RELEASED' in released[-1]['MESSAGE'], released


def test_configuration_error_fails_once_without_restart(installed, consul, key):
    ct = installed
    configure(ct, consul, key, dcs_type='etcd')
    ct.systemctl('reset-failed', UNIT, check=False)
    res = ct.systemctl('start', UNIT, check=False)
    assert res.returncode != 0, 'the start job fails: the daemon exited before READY=1'
    p = props(ct, 'ActiveState', 'SubState', 'Result', 'ExecMainStatus', 'NRestarts')
    # A restart would show as activating/auto-restart right after the exit.
    assert (p['ActiveState'], p['SubState'], p['ExecMainStatus']) == ('failed', 'failed', '78'), p
    assert p['NRestarts'] == '0', p
    # Not the stale "starting: connecting to Consul…" (issue 10, point 5).
    status = props(ct, 'StatusText')['StatusText']
    assert status == '' or status.startswith('stopped: configuration error: '), status
    logged = journal_entries(ct, this_run(ct))
    errors = [e for e in logged if e.get('MESSAGE_ID') == MSG_CONFIG]
    assert len(errors) == 1, logged
    assert errors[0]['PRIORITY'] == '3', errors[0]
    assert 'etcd' in errors[0]['MESSAGE'] and '/etc/vip-manager.yml' in errors[0]['MESSAGE']
    assert not [e for e in logged if 'Traceback' in e.get('MESSAGE', '')], 'one line, no traceback'
    assert consul.kv_get(key) is None
    explained = ct.journal('-x', '-u', UNIT, f'MESSAGE_ID={MSG_CONFIG}')
    assert 'Subject: configuration error, not starting' in explained


def test_loaded_unit_verifies_and_exposure_at_most_1_1(installed):
    res = installed.run(['systemd-analyze', 'verify', UNIT], check=False)
    complaints = [line for line in res.stderr.splitlines()
                  if line.strip() and 'man vip-elector(8)' not in line]  # no man(1) in the container
    assert not complaints, res.stderr
    res = installed.run(['systemd-analyze', 'security', '--no-pager', UNIT])
    score = _exposure(res.stdout)
    print(f'exposure in the container: {score}')
    assert score <= 1.1
