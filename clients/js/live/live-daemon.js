#!/usr/bin/env node
'use strict';
// The JavaScript client against the real daemon's REST API: one line per check, exit 1 on any failure.
//
// Run: node clients/js/live/live-daemon.js
// Needs (fails, never skips, when one is missing):
//   SEAMLESS_REST_SOCKET         unix socket of the daemon's REST API (e.g. /run/containerd-seamless/rest.sock)
//   SEAMLESS_TEST_CONTAINER      a running container in the daemon's REST namespace
//   SEAMLESS_TEST_TARGET_PREFIX  an image name without tag the commits are pushed to (e.g. 127.0.0.1:5000/clients/js)
// Optional:
//   SEAMLESS_TEST_NAMESPACE      containerd namespace of the container (default: the daemon's [rest] namespace)
//   SEAMLESS_TEST_INSECURE       "0" to push over TLS; by default the target registry is plain HTTP (targetInsecure)
//   SEAMLESS_TEST_TIMEOUT        seconds to wait for each commit (default 600)
//
// It lives outside test/ so that the offline `node --test clients/js/test/` never runs it.

const path = require('node:path');
const {
  SeamlessSnapshotClient,
  SeamlessSnapshotError,
  SnapshotState,
  parseGoDuration,
  parseRFC3339,
} = require(path.join(__dirname, '..'));

const REQUIRED = ['SEAMLESS_REST_SOCKET', 'SEAMLESS_TEST_CONTAINER', 'SEAMLESS_TEST_TARGET_PREFIX'];

class CheckFailed extends Error {
  constructor(message) {
    super(message);
    this.name = 'CheckFailed';
  }
}

function expect(condition, what) {
  if (!condition) throw new CheckFailed(what);
}

function expectDuration(value, what) {
  expect(typeof value === 'string', `${what} is a string, got ${JSON.stringify(value)}`);
  const seconds = parseGoDuration(value);
  expect(seconds >= 0, `${what} ${JSON.stringify(value)} is not negative`);
  return seconds;
}

function expectRFC3339(value, what) {
  expect(typeof value === 'string', `${what} is a string, got ${JSON.stringify(value)}`);
  return parseRFC3339(value);
}

async function expectError(call, name, status, code) {
  try {
    await call();
  } catch (error) {
    expect(error instanceof SeamlessSnapshotError, `a SeamlessSnapshotError, got ${error && error.stack}`);
    expect(error.name === name, `threw ${error.name}, wanted ${name}: ${error.message}`);
    expect(error.status === status, `status ${error.status}, wanted ${status}: ${error.message}`);
    expect(error.code === code, `code ${error.code}, wanted ${code}: ${error.message}`);
    expect(typeof error.message === 'string' && error.message !== '', 'a message');
    return error;
  }
  throw new CheckFailed(`no error, wanted ${code} ${status}`);
}

function expectCompletedStatus(status, snapshotId, what) {
  expect(status.snapshotId === snapshotId, `${what}: snapshotId ${status.snapshotId}`);
  expect(status.state === SnapshotState.COMPLETED, `${what}: state ${status.state}, error ${JSON.stringify(status.error)}`);
  expect(
    typeof status.progress === 'number' && status.progress >= 0 && status.progress <= 1,
    `${what}: progress ${status.progress}`,
  );
  expect(status.startTime instanceof Date, `${what}: startTime is a Date`);
  expect(status.endTime instanceof Date, `${what}: endTime ${status.endTime} once completed`);
  expect(status.endTime >= status.startTime, `${what}: endTime before startTime`);
  expect(status.error === undefined, `${what}: error ${JSON.stringify(status.error)} on a completed job`);
  expectRFC3339(status.raw.start_time, `${what}: raw start_time`);
  expectRFC3339(status.raw.end_time, `${what}: raw end_time`);
}

// Every id of listSnapshots, page by page.
async function allSnapshotIds(client, filters = {}) {
  const ids = [];
  let offset = 0;
  for (;;) {
    const page = await client.listSnapshots({ ...filters, offset });
    expect(Number.isInteger(page.total) && page.total >= 0, `list: total ${page.total}`);
    expect(page.offset === offset, `list: offset ${page.offset}, asked ${offset}`);
    ids.push(...page.snapshots.map((status) => status.snapshotId));
    offset += page.snapshots.length;
    if (page.snapshots.length === 0 || offset >= page.total) return ids;
  }
}

async function main({ env = process.env, print = console.log } = {}) {
  const missing = REQUIRED.filter((name) => !env[name]);
  if (missing.length > 0) {
    print(`FAIL environment: missing ${missing.join(', ')} (see the header of ${__filename})`);
    return 1;
  }
  const container = env.SEAMLESS_TEST_CONTAINER;
  const prefix = env.SEAMLESS_TEST_TARGET_PREFIX;
  const namespace = env.SEAMLESS_TEST_NAMESPACE || undefined;
  const targetInsecure = (env.SEAMLESS_TEST_INSECURE || '1') !== '0';
  const timeoutMs = Number(env.SEAMLESS_TEST_TIMEOUT || '600') * 1000;
  const client = new SeamlessSnapshotClient({ socketPath: env.SEAMLESS_REST_SOCKET, timeout: timeoutMs });
  const ids = {};

  const checks = [
    [
      'createSnapshot({ wait: true }) -> completed, every field typed',
      async () => {
        const result = await client.createSnapshot({
          containerId: container,
          targetRef: `${prefix}:wait`,
          wait: true,
          namespace,
          options: { targetInsecure },
        });
        expect(typeof result.snapshotId === 'string' && result.snapshotId !== '', `snapshotId ${result.snapshotId}`);
        const pause = expectDuration(result.pauseTime, 'pauseTime');
        const total = expectDuration(result.totalTime, 'totalTime');
        expect(pause <= total, `pause ${result.pauseTime} <= total ${result.totalTime}`);
        for (const field of ['oldUpperDir', 'newUpperDir']) {
          const value = result[field];
          expect(typeof value === 'string' && value.startsWith('/'), `${field} ${JSON.stringify(value)} is an absolute path`);
        }
        if (result.raw.state !== undefined) {
          expect(result.state === SnapshotState.COMPLETED, `state ${JSON.stringify(result.raw.state)} after wait`);
        }
        for (const extra of ['start_time', 'end_time']) {
          if (result.raw[extra] !== undefined && result.raw[extra] !== null) expectRFC3339(result.raw[extra], extra);
        }
        ids.waited = result.snapshotId;
        expectCompletedStatus(await client.getSnapshot(result.snapshotId), result.snapshotId, 'get after wait');
        return `${result.snapshotId} pause ${result.pauseTime} total ${result.totalTime}`;
      },
    ],
    [
      'createSnapshot({ wait: false }) then waitFor -> completed',
      async () => {
        const result = await client.createSnapshot({
          containerId: container,
          targetRef: `${prefix}:poll`,
          wait: false,
          namespace,
          options: { targetInsecure },
        });
        expect(typeof result.snapshotId === 'string' && result.snapshotId !== '', `snapshotId ${result.snapshotId}`);
        expect(result.snapshotId !== ids.waited, 'a new snapshot id');
        if (result.pauseTime !== undefined) expectDuration(result.pauseTime, 'pauseTime');
        ids.polled = result.snapshotId;
        const status = await client.waitFor(result.snapshotId, { timeout: timeoutMs, interval: 500 });
        expect(status.state === SnapshotState.COMPLETED, `state ${status.state}, error ${JSON.stringify(status.error)}`);
        return `${result.snapshotId} ${status.state}`;
      },
    ],
    [
      'getSnapshot of the polled id',
      async () => {
        expect(ids.polled, 'needs the polled snapshot of the check before');
        const status = await client.getSnapshot(ids.polled);
        expectCompletedStatus(status, ids.polled, 'get');
        return `${status.state} progress ${status.progress} ${status.startTime.toISOString()} .. ${status.endTime.toISOString()}`;
      },
    ],
    [
      'listSnapshots contains both ids',
      async () => {
        expect(ids.waited && ids.polled, 'needs both snapshots of the checks before');
        const listed = await allSnapshotIds(client);
        for (const id of [ids.waited, ids.polled]) expect(listed.includes(id), `${id} in listSnapshots()`);
        const completed = await allSnapshotIds(client, { state: SnapshotState.COMPLETED });
        for (const id of [ids.waited, ids.polled]) expect(completed.includes(id), `${id} in listSnapshots({ state: completed })`);
        const failed = await allSnapshotIds(client, { state: SnapshotState.FAILED });
        expect(!failed.includes(ids.polled), 'the completed job is not listed as failed');
        return `${listed.length} listed, both ids present`;
      },
    ],
    [
      'getSnapshot of an unknown id -> SNAPSHOT_NOT_FOUND 404',
      async () =>
        (await expectError(() => client.getSnapshot('snapshot-does-not-exist-0'), 'SnapshotNotFoundError', 404, 'SNAPSHOT_NOT_FOUND'))
          .message,
    ],
    [
      'createSnapshot of no-such-container-xyz -> CONTAINER_NOT_FOUND 404',
      async () =>
        (
          await expectError(
            () =>
              client.createSnapshot({
                containerId: 'no-such-container-xyz',
                targetRef: `${prefix}:none`,
                namespace,
                options: { targetInsecure },
              }),
            'ContainerNotFoundError',
            404,
            'CONTAINER_NOT_FOUND',
          )
        ).message,
    ],
    [
      'metrics(): total >= 2, Go-duration averages',
      async () => {
        const metrics = await client.metrics();
        expect(metrics.totalSnapshots >= 2, `totalSnapshots ${metrics.totalSnapshots} >= 2`);
        expect(metrics.successfulSnapshots >= 2, `successfulSnapshots ${metrics.successfulSnapshots} >= 2`);
        expect(metrics.failedSnapshots >= 0, `failedSnapshots ${metrics.failedSnapshots}`);
        expectDuration(metrics.averagePauseTime, 'averagePauseTime');
        expectDuration(metrics.averageTotalTime, 'averageTotalTime');
        expectDuration(metrics.averageBackgroundTime, 'averageBackgroundTime');
        expect(metrics.timestamp instanceof Date, 'timestamp is a Date');
        return (
          `total ${metrics.totalSnapshots} ok ${metrics.successfulSnapshots} failed ${metrics.failedSnapshots}` +
          ` pause ${metrics.averagePauseTime} total ${metrics.averageTotalTime} background ${metrics.averageBackgroundTime}`
        );
      },
    ],
    [
      'prometheusMetrics(): success counter',
      async () => {
        const text = await client.prometheusMetrics();
        expect(text.includes('nydus_seamless_snapshots_total{status="success"}'), 'the success counter is exported');
        return `${text.split('\n').filter(Boolean).length} lines`;
      },
    ],
  ];

  let failures = 0;
  for (const [name, check] of checks) {
    try {
      print(`ok   ${name}: ${await check()}`);
    } catch (error) {
      failures += 1;
      if (error instanceof CheckFailed || error instanceof SeamlessSnapshotError || error instanceof RangeError) {
        print(`FAIL ${name}: ${error.name}: ${error.message}`);
      } else {
        // A bug of the client or of this script: show all of it.
        print(`FAIL ${name}: unexpected error\n${error && error.stack}`);
      }
    }
  }
  print(`${checks.length - failures} of ${checks.length} checks passed`);
  return failures === 0 ? 0 : 1;
}

module.exports = { main, REQUIRED };

if (require.main === module) {
  main().then(
    (code) => {
      process.exitCode = code;
    },
    (error) => {
      console.log(`FAIL unexpected: ${error && error.stack}`);
      process.exitCode = 1;
    },
  );
}
