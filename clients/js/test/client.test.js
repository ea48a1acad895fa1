'use strict';
// SeamlessSnapshotClient against a fake daemon on a unix socket and on TCP: the requests it sends
// and how it reads every answer of the REST contract (rest-contract.md of issue 16).

const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const nydus = require('..');
const { FakeDaemon, errorAnswer } = require('../test-support/fake-daemon');

const { SeamlessSnapshotClient, SeamlessSnapshotError, SnapshotState } = nydus;

const CREATED = {
  snapshot_id: 'snapshot-1752857512540089368',
  pause_time: '8.72416ms',
  total_time: '22.802283ms',
  old_upper_dir: '/var/lib/seamless/snapshots/12/fs',
  new_upper_dir: '/var/lib/seamless/snapshots/13/fs',
  state: 'completed',
  progress: 1.0,
  start_time: '2025-07-18T16:51:52Z',
  end_time: '2025-07-18T16:51:53Z',
  namespace: 'default',
  container_id: 'mycontainer',
  target_ref: 'registry.example.com/myimage:snapshot',
};

const RUNNING = {
  snapshot_id: 'snapshot-2',
  state: 'processing',
  progress: 0.75,
  start_time: '2025-07-18T16:51:52.123456789Z',
  end_time: null,
  stage: 'pushing',
  pause_time: '512.3\u00b5s',
};

const COMPLETED = { ...RUNNING, state: 'completed', progress: 1, end_time: '2025-07-18T16:52:57Z' };

const FAILED = {
  snapshot_id: 'snapshot-3',
  state: 'failed',
  progress: 0.5,
  start_time: '2025-07-18T16:51:52Z',
  end_time: '2025-07-18T16:52:57Z',
  error: 'push to 127.0.0.1:5000/x:y: connection refused',
};

const METRICS = {
  metrics: {
    total_snapshots: 100,
    successful_snapshots: 98,
    failed_snapshots: 2,
    average_pause_time: '22.5\u00b5s',
    average_total_time: '25.3ms',
    average_background_time: '58.7s',
    in_flight: 0,
  },
  timestamp: '2025-07-18T16:51:52Z',
  version: '1',
};

const PROMETHEUS =
  'nydus_seamless_snapshots_total{status="success"} 98\n' +
  'nydus_seamless_snapshots_total{status="failed"} 2\n' +
  'nydus_seamless_pause_time_seconds{quantile="0.5"} 0.0000225\n';

// Runs `body(daemon, client)` against a fresh fake daemon, closing it afterwards.
function withDaemon(name, { tcp = false, token } = {}, body) {
  test(name, async () => {
    const daemon = await FakeDaemon.start({ tcp });
    try {
      await body(daemon, new SeamlessSnapshotClient({ baseURL: daemon.baseURL, token }));
    } finally {
      await daemon.close();
    }
  });
}

withDaemon('createSnapshot sends the reference body and reads every field', {}, async (daemon, client) => {
  daemon.on('POST', '/api/v1/snapshots', [201, CREATED]);
  const result = await client.createSnapshot({
    containerId: 'mycontainer',
    targetRef: 'registry.example.com/myimage:snapshot',
    wait: true,
  });
  assert.strictEqual(daemon.requests.length, 1);
  const [request] = daemon.requests;
  assert.strictEqual(request.method, 'POST');
  assert.strictEqual(request.path, '/api/v1/snapshots');
  assert.strictEqual(request.headers['content-type'], 'application/json');
  assert.strictEqual(request.headers.authorization, undefined);
  assert.deepStrictEqual(request.json(), {
    container_id: 'mycontainer',
    target_ref: 'registry.example.com/myimage:snapshot',
    options: { wait: true },
  });
  assert.strictEqual(result.snapshotId, 'snapshot-1752857512540089368');
  assert.strictEqual(result.pauseTime, '8.72416ms');
  assert.strictEqual(result.totalTime, '22.802283ms');
  assert.strictEqual(result.oldUpperDir, '/var/lib/seamless/snapshots/12/fs');
  assert.strictEqual(result.newUpperDir, '/var/lib/seamless/snapshots/13/fs');
  assert.strictEqual(result.pauseSeconds, 0.00872416);
  assert.strictEqual(result.totalSeconds, 0.022802283);
  assert.strictEqual(result.state, SnapshotState.COMPLETED);
  assert.deepStrictEqual(result.raw, CREATED);
});

withDaemon('createSnapshot sends the namespace and every option', {}, async (daemon, client) => {
  daemon.on('POST', '/api/v1/snapshots', [201, CREATED]);
  await client.createSnapshot({
    containerId: 'c1',
    targetRef: '127.0.0.1:5000/a:b',
    namespace: 'k8s.io',
    options: {
      workDir: '/tmp',
      fsVersion: '6',
      compressor: 'lz4_block',
      targetInsecure: true,
      sourceInsecure: false,
      withPaths: ['/data'],
      without_paths: ['/tmp', '/var/cache'], // the wire name works too
      maximumTimes: 10,
      backgroundWorkers: 4,
      format: 'oci',
      targetCreds: { username: 'u', password: 'p' },
      sourceCreds: { password: 'sp', username: 'su' },
    },
  });
  assert.deepStrictEqual(daemon.requests[0].json(), {
    container_id: 'c1',
    target_ref: '127.0.0.1:5000/a:b',
    namespace: 'k8s.io',
    options: {
      wait: false,
      work_dir: '/tmp',
      fs_version: '6',
      compressor: 'lz4_block',
      target_insecure: true,
      source_insecure: false,
      with_paths: ['/data'],
      without_paths: ['/tmp', '/var/cache'],
      maximum_times: 10,
      background_workers: 4,
      format: 'oci',
      target_creds: { username: 'u', password: 'p' },
      source_creds: { username: 'su', password: 'sp' },
    },
  });
});

withDaemon('createSnapshot leaves out unset options and refuses bad ones before sending', {}, async (daemon, client) => {
  daemon.on('POST', '/api/v1/snapshots', [201, CREATED]);
  await client.createSnapshot({ containerId: 'c1', targetRef: 'r:t', options: { fsVersion: undefined, compressor: null } });
  assert.deepStrictEqual(daemon.requests[0].json().options, { wait: false });
  const bad = [
    { containerId: 'c1', targetRef: 'r:t', options: { compresor: 'zstd' } },
    { containerId: 'c1', targetRef: 'r:t', options: { withPaths: '/data' } },
    { containerId: 'c1', targetRef: 'r:t', options: { targetCreds: { user: 'u' } } },
    { targetRef: 'r:t' },
    { containerId: 'c1' },
  ];
  for (const request of bad) {
    await assert.rejects(client.createSnapshot(request), TypeError, JSON.stringify(request));
  }
  assert.strictEqual(daemon.requests.length, 1);
});

withDaemon('createSnapshot without wait reads an answer without total_time', {}, async (daemon, client) => {
  daemon.on('POST', '/api/v1/snapshots', [201, { snapshot_id: 'snapshot-9', pause_time: '1.5s', state: 'processing' }]);
  const result = await client.createSnapshot({ containerId: 'c1', targetRef: 'r:t' });
  assert.strictEqual(result.snapshotId, 'snapshot-9');
  assert.strictEqual(result.pauseSeconds, 1.5);
  assert.strictEqual(result.totalTime, undefined);
  assert.strictEqual(result.totalSeconds, undefined);
  assert.strictEqual(result.oldUpperDir, undefined);
  assert.strictEqual(result.state, 'processing');
});

withDaemon('createSnapshot with wait of a failed job rejects with its code', {}, async (daemon, client) => {
  daemon.on(
    'POST',
    '/api/v1/snapshots',
    errorAnswer(500, 'BACKGROUND_PROCESSING_FAILED', 'push failed', {
      snapshot_id: 'snapshot-3',
      timestamp: '2025-07-18T16:51:52Z',
    }),
  );
  await assert.rejects(client.createSnapshot({ containerId: 'c1', targetRef: 'r:t', wait: true }), (error) => {
    assert.ok(error instanceof nydus.BackgroundProcessingFailedError);
    assert.ok(error instanceof SeamlessSnapshotError);
    assert.strictEqual(error.status, 500);
    assert.strictEqual(error.code, 'BACKGROUND_PROCESSING_FAILED');
    assert.strictEqual(error.message, 'push failed');
    assert.strictEqual(error.details.snapshot_id, 'snapshot-3');
    return true;
  });
});

withDaemon('getSnapshot of a running job', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/snapshots/snapshot-2', [200, RUNNING]);
  const status = await client.getSnapshot('snapshot-2');
  assert.strictEqual(daemon.requests[0].method, 'GET');
  assert.strictEqual(status.snapshotId, 'snapshot-2');
  assert.strictEqual(status.state, SnapshotState.PROCESSING);
  assert.strictEqual(status.progress, 0.75);
  assert.ok(status.startTime instanceof Date);
  assert.strictEqual(status.startTime.toISOString(), '2025-07-18T16:51:52.123Z');
  assert.strictEqual(status.endTime, null);
  assert.strictEqual(status.error, undefined);
  assert.strictEqual(status.ended, false);
  assert.strictEqual(status.raw.stage, 'pushing');
});

withDaemon('getSnapshot of a failed job, with an id that needs encoding', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/snapshots/snap%2Fshot%20x', [200, FAILED]);
  const status = await client.getSnapshot('snap/shot x');
  assert.strictEqual(status.state, 'failed');
  assert.strictEqual(status.error, 'push to 127.0.0.1:5000/x:y: connection refused');
  assert.strictEqual(status.endTime.toISOString(), '2025-07-18T16:52:57.000Z');
  assert.strictEqual(status.ended, true);
});

withDaemon('getSnapshot of an unknown id rejects with SNAPSHOT_NOT_FOUND', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/snapshots/nope', errorAnswer(404, 'SNAPSHOT_NOT_FOUND', 'snapshot nope not found', { snapshot_id: 'nope' }));
  await assert.rejects(client.getSnapshot('nope'), (error) => {
    assert.ok(error instanceof nydus.SnapshotNotFoundError);
    assert.strictEqual(error.name, 'SnapshotNotFoundError');
    assert.strictEqual(error.status, 404);
    assert.strictEqual(error.code, 'SNAPSHOT_NOT_FOUND');
    assert.deepStrictEqual(error.details, { snapshot_id: 'nope' });
    return true;
  });
});

withDaemon('listSnapshots sends its query and reads the page', {}, async (daemon, client) => {
  const page = { snapshots: [RUNNING, FAILED], total: 7, limit: 2, offset: 4 };
  daemon.on('GET', '/api/v1/snapshots?state=failed&limit=2&offset=4', [200, page]);
  daemon.on('GET', '/api/v1/snapshots', [200, { ...page, snapshots: [], limit: 100, offset: 0 }]);
  const listed = await client.listSnapshots({ state: SnapshotState.FAILED, limit: 2, offset: 4 });
  assert.deepStrictEqual(
    listed.snapshots.map((s) => [s.snapshotId, s.state]),
    [
      ['snapshot-2', 'processing'],
      ['snapshot-3', 'failed'],
    ],
  );
  assert.ok(listed.snapshots[0].startTime instanceof Date);
  assert.deepStrictEqual([listed.total, listed.limit, listed.offset], [7, 2, 4]);
  const everything = await client.listSnapshots();
  assert.strictEqual(daemon.requests[1].path, '/api/v1/snapshots');
  assert.deepStrictEqual([everything.snapshots, everything.limit], [[], 100]);
  await assert.rejects(client.listSnapshots({ state: 'sleeping' }), TypeError);
});

withDaemon('metrics reads counters, averages and the timestamp', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/metrics', [200, METRICS]);
  const metrics = await client.metrics();
  assert.deepStrictEqual(
    [metrics.totalSnapshots, metrics.successfulSnapshots, metrics.failedSnapshots],
    [100, 98, 2],
  );
  assert.strictEqual(metrics.averagePauseTime, '22.5\u00b5s');
  assert.strictEqual(metrics.averageTotalTime, '25.3ms');
  assert.strictEqual(metrics.averageBackgroundTime, '58.7s');
  assert.strictEqual(metrics.averagePauseSeconds, 0.0000225);
  assert.strictEqual(metrics.averageTotalSeconds, 0.0253);
  assert.strictEqual(metrics.averageBackgroundSeconds, 58.7);
  assert.strictEqual(metrics.timestamp.toISOString(), '2025-07-18T16:51:52.000Z');
  assert.strictEqual(metrics.raw.metrics.in_flight, 0);
});

withDaemon('prometheusMetrics returns the text', {}, async (daemon, client) => {
  daemon.on('GET', '/metrics', [200, PROMETHEUS]);
  const text = await client.prometheusMetrics();
  assert.strictEqual(text, PROMETHEUS);
  assert.strictEqual(daemon.requests[0].headers.accept, 'text/plain');
});

withDaemon('waitFor polls until the job ends', {}, async (daemon, client) => {
  daemon.on(
    'GET',
    '/api/v1/snapshots/snapshot-2',
    [200, { ...RUNNING, state: 'pending', progress: 0 }],
    [200, RUNNING],
    [200, COMPLETED],
  );
  const status = await client.waitFor('snapshot-2', { timeout: 10000, interval: 10 });
  assert.strictEqual(status.state, 'completed');
  assert.strictEqual(status.progress, 1);
  assert.strictEqual(daemon.requests.length, 3);
});

withDaemon('waitFor resolves to a failed job', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/snapshots/snapshot-3', [200, RUNNING], [200, FAILED]);
  const status = await client.waitFor('snapshot-3', { timeout: 10000, interval: 10 });
  assert.strictEqual(status.state, 'failed');
  assert.ok(status.error);
});

withDaemon('waitFor gives up after its timeout', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/snapshots/snapshot-2', [200, RUNNING]);
  await assert.rejects(client.waitFor('snapshot-2', { timeout: 200, interval: 50 }), (error) => {
    assert.ok(error instanceof nydus.WaitTimeoutError);
    assert.strictEqual(error.code, 'WAIT_TIMEOUT');
    assert.strictEqual(error.status, null);
    return true;
  });
  assert.ok(daemon.requests.length >= 2);
});

withDaemon('waitFor passes a not-found on', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/snapshots/gone', errorAnswer(404, 'SNAPSHOT_NOT_FOUND'));
  await assert.rejects(client.waitFor('gone', { timeout: 1000, interval: 10 }), nydus.SnapshotNotFoundError);
});

withDaemon('every code of the contract rejects with its class', {}, async (daemon, client) => {
  const cases = [
    [400, 'INVALID_PARAMETER', nydus.InvalidParameterError],
    [404, 'CONTAINER_NOT_FOUND', nydus.ContainerNotFoundError],
    [404, 'SNAPSHOT_NOT_FOUND', nydus.SnapshotNotFoundError],
    [403, 'PERMISSION_DENIED', nydus.PermissionDeniedError],
    [429, 'PERMISSION_DENIED', nydus.PermissionDeniedError],
    [500, 'INTERNAL_ERROR', nydus.InternalError],
    [400, 'CONTAINER_NOT_RUNNING', nydus.ContainerNotRunningError],
    [409, 'SNAPSHOT_IN_PROGRESS', nydus.SnapshotInProgressError],
    [500, 'PAUSE_TIMEOUT', nydus.PauseTimeoutError],
    [500, 'ATOMIC_SWITCH_FAILED', nydus.AtomicSwitchFailedError],
    [500, 'BACKGROUND_PROCESSING_FAILED', nydus.BackgroundProcessingFailedError],
    [418, 'SOMETHING_NEW', SeamlessSnapshotError],
  ];
  for (const [status, code, cls] of cases) {
    const details = { container_id: 'c1', timestamp: '2025-07-18T16:51:52Z' };
    daemon.on('POST', '/api/v1/snapshots', errorAnswer(status, code, `${code} happened`, details));
    await assert.rejects(client.createSnapshot({ containerId: 'c1', targetRef: 'r:t' }), (error) => {
      assert.ok(error instanceof cls, `${code}: ${error.name}`);
      assert.ok(error instanceof SeamlessSnapshotError);
      assert.ok(error instanceof Error);
      assert.strictEqual(error.status, status);
      assert.strictEqual(error.code, code);
      assert.strictEqual(error.message, `${code} happened`);
      assert.deepStrictEqual(error.details, details);
      return true;
    });
  }
});

withDaemon('an error answer without the envelope still rejects', {}, async (daemon, client) => {
  daemon.on('GET', '/api/v1/metrics', [502, 'bad gateway'], [500, { error: 'just a string' }]);
  await assert.rejects(client.metrics(), { status: 502, code: 'HTTP_502', message: 'bad gateway' });
  await assert.rejects(client.metrics(), { status: 500, code: 'HTTP_500' });
});

withDaemon('answers that break the contract reject with INVALID_RESPONSE', {}, async (daemon, client) => {
  const broken = [
    ['GET', '/api/v1/snapshots/x', [200, 'not json'], () => client.getSnapshot('x')],
    ['GET', '/api/v1/snapshots/x', [200, [1, 2]], () => client.getSnapshot('x')],
    ['GET', '/api/v1/snapshots/x', [200, { ...RUNNING, state: 'sleeping' }], () => client.getSnapshot('x')],
    ['GET', '/api/v1/snapshots/x', [200, { ...RUNNING, start_time: 'yesterday' }], () => client.getSnapshot('x')],
    ['GET', '/api/v1/snapshots/x', [200, { ...RUNNING, progress: '75%' }], () => client.getSnapshot('x')],
    ['POST', '/api/v1/snapshots', [201, { ...CREATED, pause_time: '8.7 ms' }], () => client.createSnapshot({ containerId: 'c', targetRef: 'r:t' })],
    ['POST', '/api/v1/snapshots', [201, { pause_time: '1s' }], () => client.createSnapshot({ containerId: 'c', targetRef: 'r:t' })],
    ['GET', '/api/v1/metrics', [200, { metrics: {}, timestamp: '2025-07-18T16:51:52Z' }], () => client.metrics()],
    ['GET', '/api/v1/snapshots', [200, { snapshots: {}, total: 0, limit: 1, offset: 0 }], () => client.listSnapshots()],
  ];
  for (const [method, path, answer, call] of broken) {
    daemon.on(method, path, answer);
    await assert.rejects(call(), (error) => {
      assert.ok(error instanceof nydus.InvalidResponseError, `${JSON.stringify(answer)}: ${error}`);
      assert.strictEqual(error.code, 'INVALID_RESPONSE');
      assert.strictEqual(error.status, answer[0]);
      return true;
    });
  }
});

withDaemon('socketPath is the same transport, and sends the token when given', {}, async (daemon) => {
  const client = new SeamlessSnapshotClient({ socketPath: daemon.socketPath, token: 't0' });
  daemon.on('GET', '/api/v1/metrics', [200, METRICS]);
  assert.strictEqual((await client.metrics()).totalSnapshots, 100);
  assert.strictEqual(daemon.requests[0].headers.authorization, 'Bearer t0');
});

withDaemon('over TCP every request carries the bearer token', { tcp: true, token: 's3cret' }, async (daemon, client) => {
  daemon.on('POST', '/api/v1/snapshots', [201, CREATED]);
  daemon.on('GET', '/api/v1/snapshots/snapshot-2', [200, RUNNING]);
  daemon.on('GET', '/api/v1/snapshots', [200, { snapshots: [], total: 0, limit: 100, offset: 0 }]);
  daemon.on('GET', '/api/v1/metrics', [200, METRICS]);
  daemon.on('GET', '/metrics', [200, PROMETHEUS]);
  await client.createSnapshot({ containerId: 'mycontainer', targetRef: 'registry.example.com/myimage:snapshot', wait: true });
  await client.getSnapshot('snapshot-2');
  await client.listSnapshots();
  await client.metrics();
  await client.prometheusMetrics();
  assert.deepStrictEqual(
    daemon.requests.map((r) => `${r.method} ${r.path}`),
    ['POST /api/v1/snapshots', 'GET /api/v1/snapshots/snapshot-2', 'GET /api/v1/snapshots', 'GET /api/v1/metrics', 'GET /metrics'],
  );
  for (const request of daemon.requests) assert.strictEqual(request.headers.authorization, 'Bearer s3cret');
  assert.deepStrictEqual(daemon.requests[0].json().options, { wait: true });
});

withDaemon('over TCP a refused token rejects with PERMISSION_DENIED', { tcp: true, token: 'wrong' }, async (daemon, client) => {
  daemon.on('GET', '/api/v1/metrics', errorAnswer(403, 'PERMISSION_DENIED', 'bad token'));
  await assert.rejects(client.metrics(), { name: 'PermissionDeniedError', status: 403, code: 'PERMISSION_DENIED' });
});

withDaemon('a path prefix of the base url is kept', { tcp: true }, async (daemon) => {
  const client = new SeamlessSnapshotClient({ baseURL: `${daemon.baseURL}/seamless/` });
  daemon.on('GET', '/seamless/api/v1/metrics', [200, METRICS]);
  await client.metrics();
  assert.strictEqual(daemon.requests[0].path, '/seamless/api/v1/metrics');
});

test('a missing socket rejects with a connection error naming it', async () => {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), 'no-seamless-'));
  const socketPath = path.join(directory, 'rest.sock');
  try {
    const client = new SeamlessSnapshotClient({ socketPath });
    await assert.rejects(client.metrics(), (error) => {
      assert.ok(error instanceof nydus.SeamlessConnectionError);
      assert.strictEqual(error.code, 'CONNECTION_ERROR');
      assert.strictEqual(error.status, null);
      assert.ok(error.message.includes(socketPath), error.message);
      assert.ok(error.cause instanceof Error);
      return true;
    });
  } finally {
    fs.rmSync(directory, { recursive: true, force: true });
  }
});

test('a closed port rejects with a connection error', async () => {
  const daemon = await FakeDaemon.start({ tcp: true });
  const { baseURL } = daemon;
  await daemon.close();
  await assert.rejects(new SeamlessSnapshotClient({ baseURL }).getSnapshot('x'), { code: 'CONNECTION_ERROR' });
});

test('a request without an answer in time rejects with a connection error', async () => {
  const http = require('node:http');
  const silent = http.createServer(() => {}); // never answers
  await new Promise((resolve) => silent.listen(0, '127.0.0.1', resolve));
  try {
    const client = new SeamlessSnapshotClient({ baseURL: `http://127.0.0.1:${silent.address().port}`, timeout: 100 });
    await assert.rejects(client.metrics(), (error) => {
      assert.strictEqual(error.code, 'CONNECTION_ERROR');
      assert.ok(error.message.includes('no answer within 100ms'), error.message);
      return true;
    });
  } finally {
    silent.closeAllConnections?.();
    await new Promise((resolve) => silent.close(resolve));
  }
});

test('bad constructor arguments are refused up front', () => {
  assert.throws(() => new SeamlessSnapshotClient({ baseURL: 'http://h:1', socketPath: '/x' }), TypeError);
  assert.throws(() => new SeamlessSnapshotClient({ baseURL: 'ftp://h' }), TypeError);
  assert.throws(() => new SeamlessSnapshotClient({ baseURL: 'unix://' }), TypeError);
  assert.throws(() => new SeamlessSnapshotClient({ baseURL: 'not a url' }), TypeError);
  assert.strictEqual(new SeamlessSnapshotClient().endpoint, 'unix:///run/containerd-seamless/rest.sock');
  assert.strictEqual(new SeamlessSnapshotClient({ baseURL: 'unix:///tmp/r.sock' }).endpoint, 'unix:///tmp/r.sock');
});
