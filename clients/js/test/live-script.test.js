'use strict';
// live/live-daemon.js itself, run against a simulated daemon: its checks pass on answers that follow
// the contract, fail on ones that do not, and the script fails when its environment is missing.

const test = require('node:test');
const assert = require('node:assert');
const { FakeDaemon } = require('../test-support/fake-daemon');
const live = require('../live/live-daemon');

// Just enough state for the live script's flow: jobs that take two polls to complete.
class SimulatedDaemon {
  constructor(daemon, container = 'c1') {
    this.container = container;
    this.jobs = new Map();
    this.breakMetrics = false;
    daemon.onAny((request) => this.answer(request));
  }

  status(id) {
    const job = this.jobs.get(id);
    const ended = job.state === 'completed';
    return {
      snapshot_id: id,
      state: job.state,
      progress: ended ? 1 : 0.5,
      start_time: '2026-12-07T17:00:00.123456789Z',
      end_time: ended ? '2026-12-07T17:00:01Z' : null,
      stage: ended ? 'done' : 'pushing',
    };
  }

  answer(request) {
    const url = new URL(request.path, 'http://x');
    if (request.method === 'POST' && url.pathname === '/api/v1/snapshots') {
      const body = request.json();
      if (body.container_id !== this.container) {
        return [404, { error: { code: 'CONTAINER_NOT_FOUND', message: 'no container', details: { container_id: body.container_id } } }];
      }
      const id = `snapshot-${this.jobs.size + 1}`;
      this.jobs.set(id, { state: body.options.wait ? 'completed' : 'processing', polls: 0 });
      return [
        201,
        { ...this.status(id), pause_time: '512.3\u00b5s', total_time: '1.5s', old_upper_dir: '/var/lib/s/1/fs', new_upper_dir: '/var/lib/s/2/fs' },
      ];
    }
    if (request.method === 'GET' && url.pathname.startsWith('/api/v1/snapshots/')) {
      const id = decodeURIComponent(url.pathname.split('/').pop());
      const job = this.jobs.get(id);
      if (!job) return [404, { error: { code: 'SNAPSHOT_NOT_FOUND', message: 'no snapshot', details: {} } }];
      job.polls += 1;
      if (job.polls >= 2) job.state = 'completed';
      return [200, this.status(id)];
    }
    if (request.method === 'GET' && url.pathname === '/api/v1/snapshots') {
      const state = url.searchParams.get('state');
      const ids = [...this.jobs.keys()].filter((id) => state === null || this.jobs.get(id).state === state);
      const offset = Number(url.searchParams.get('offset') || 0);
      // Pages of one, to exercise the script's paging.
      const page = ids.slice(offset, offset + 1).map((id) => this.status(id));
      return [200, { snapshots: page, total: ids.length, limit: 1, offset }];
    }
    if (url.pathname === '/api/v1/metrics') {
      const done = [...this.jobs.values()].filter((job) => job.state === 'completed').length;
      return [
        200,
        {
          metrics: {
            total_snapshots: this.jobs.size,
            successful_snapshots: done,
            failed_snapshots: 0,
            average_pause_time: '512.3\u00b5s',
            average_total_time: this.breakMetrics ? '1.5 s' : '1.5s',
            average_background_time: '1s',
          },
          timestamp: new Date().toISOString(),
        },
      ];
    }
    if (url.pathname === '/metrics') return [200, `nydus_seamless_snapshots_total{status="success"} ${this.jobs.size}\n`];
    return [404, { error: { code: 'INVALID_PARAMETER', message: url.pathname, details: {} } }];
  }
}

async function runScript(configure = () => {}, dropVariable) {
  const daemon = await FakeDaemon.start();
  const simulated = new SimulatedDaemon(daemon);
  configure(simulated);
  const env = {
    SEAMLESS_REST_SOCKET: daemon.socketPath,
    SEAMLESS_TEST_CONTAINER: 'c1',
    SEAMLESS_TEST_TARGET_PREFIX: '127.0.0.1:5000/clients/js',
    SEAMLESS_TEST_NAMESPACE: 'seamless-test',
  };
  if (dropVariable) delete env[dropVariable];
  const lines = [];
  try {
    const code = await live.main({ env, print: (line) => lines.push(line) });
    return { code, lines, requests: daemon.requests };
  } finally {
    await daemon.close();
  }
}

test('every check passes on a daemon that follows the contract', async () => {
  const { code, lines, requests } = await runScript();
  assert.strictEqual(code, 0, lines.join('\n'));
  assert.strictEqual(lines.filter((line) => line.startsWith('ok   ')).length, 8, lines.join('\n'));
  assert.strictEqual(lines.at(-1), '8 of 8 checks passed');
  const creates = requests.filter((r) => r.method === 'POST').map((r) => r.json());
  assert.deepStrictEqual(
    creates.map((c) => [c.container_id, c.target_ref, c.options.wait, c.namespace, c.options.target_insecure]),
    [
      ['c1', '127.0.0.1:5000/clients/js:wait', true, 'seamless-test', true],
      ['c1', '127.0.0.1:5000/clients/js:poll', false, 'seamless-test', true],
      ['no-such-container-xyz', '127.0.0.1:5000/clients/js:none', false, 'seamless-test', true],
    ],
  );
});

test('a check fails on an answer that breaks the contract', async () => {
  const { code, lines } = await runScript((simulated) => {
    simulated.breakMetrics = true;
  });
  assert.strictEqual(code, 1, lines.join('\n'));
  assert.ok(lines.some((line) => line.startsWith('FAIL metrics()')), lines.join('\n'));
  assert.strictEqual(lines.at(-1), '7 of 8 checks passed');
});

test('a missing variable fails and is named', async () => {
  const { code, lines, requests } = await runScript(undefined, 'SEAMLESS_TEST_CONTAINER');
  assert.strictEqual(code, 1);
  assert.match(lines[0], /^FAIL environment: missing SEAMLESS_TEST_CONTAINER /);
  assert.deepStrictEqual(requests, []);
});
