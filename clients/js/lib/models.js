'use strict';
// Typed answers of the REST API, each built from the decoded JSON by one function that checks every
// field it names and throws an InvalidResponseError when one is missing or of the wrong type; the
// contract's extras stay in `raw`, the whole decoded object.

const { parseGoDuration, parseRFC3339 } = require('./durations');
const { errorOfCode } = require('./errors');

/** The states of a snapshot job. */
const SnapshotState = Object.freeze({
  PENDING: 'pending',
  PROCESSING: 'processing',
  COMPLETED: 'completed',
  FAILED: 'failed',
});
const STATES = new Set(Object.values(SnapshotState));

function invalid(message) {
  return errorOfCode({ status: null, code: 'INVALID_RESPONSE', message });
}

function object(body, what) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw invalid(`${what} is not a json object: ${JSON.stringify(body)}`);
  }
  return body;
}

function string(body, key, what) {
  const value = body[key];
  if (typeof value !== 'string') throw invalid(`${what} has no string "${key}": ${JSON.stringify(value)}`);
  return value;
}

function optionalString(body, key, what) {
  const value = body[key];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'string') throw invalid(`${what} has a non-string "${key}": ${JSON.stringify(value)}`);
  return value;
}

function integer(body, key, what) {
  const value = body[key];
  if (!Number.isInteger(value)) throw invalid(`${what} has no integer "${key}": ${JSON.stringify(value)}`);
  return value;
}

function number(body, key, what) {
  const value = body[key];
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    throw invalid(`${what} has no number "${key}": ${JSON.stringify(value)}`);
  }
  return value;
}

// A Go duration as sent, and its seconds; undefined/undefined when absent and not required.
function duration(body, key, what, required) {
  const text = required ? string(body, key, what) : optionalString(body, key, what);
  if (text === undefined) return [undefined, undefined];
  try {
    return [text, parseGoDuration(text)];
  } catch (error) {
    throw invalid(`${what} "${key}": ${error.message}`);
  }
}

function time(value, key, what) {
  try {
    return parseRFC3339(value);
  } catch (error) {
    throw invalid(`${what} "${key}": ${error.message}`);
  }
}

/** The answer of createSnapshot. A field the daemon left out is undefined. */
function snapshotResult(body) {
  const what = 'snapshot result';
  object(body, what);
  const [pauseTime, pauseSeconds] = duration(body, 'pause_time', what, false);
  const [totalTime, totalSeconds] = duration(body, 'total_time', what, false);
  const result = {
    snapshotId: string(body, 'snapshot_id', what),
    pauseTime,
    totalTime,
    oldUpperDir: optionalString(body, 'old_upper_dir', what),
    newUpperDir: optionalString(body, 'new_upper_dir', what),
    pauseSeconds,
    totalSeconds,
    state: STATES.has(body.state) ? body.state : undefined,
    raw: body,
  };
  return result;
}

/** The answer of getSnapshot, and each element of listSnapshots. */
function snapshotStatus(body) {
  const what = 'snapshot status';
  object(body, what);
  const state = string(body, 'state', what);
  if (!STATES.has(state)) throw invalid(`${what} has an unknown state ${JSON.stringify(state)}`);
  const endTime = body.end_time;
  return {
    snapshotId: string(body, 'snapshot_id', what),
    state,
    progress: number(body, 'progress', what),
    startTime: time(string(body, 'start_time', what), 'start_time', what),
    endTime: endTime === null || endTime === undefined ? null : time(endTime, 'end_time', what),
    error: optionalString(body, 'error', what),
    ended: state === SnapshotState.COMPLETED || state === SnapshotState.FAILED,
    raw: body,
  };
}

/** The answer of listSnapshots. */
function snapshotPage(body) {
  const what = 'snapshot list';
  object(body, what);
  if (!Array.isArray(body.snapshots)) {
    throw invalid(`${what} has no list "snapshots": ${JSON.stringify(body.snapshots)}`);
  }
  return {
    snapshots: body.snapshots.map(snapshotStatus),
    total: integer(body, 'total', what),
    limit: integer(body, 'limit', what),
    offset: integer(body, 'offset', what),
    raw: body,
  };
}

/** The answer of metrics. */
function metrics(body) {
  const what = 'metrics';
  object(body, what);
  const counters = object(body.metrics, 'metrics.metrics');
  const [averagePauseTime, averagePauseSeconds] = duration(counters, 'average_pause_time', what, true);
  const [averageTotalTime, averageTotalSeconds] = duration(counters, 'average_total_time', what, true);
  const [averageBackgroundTime, averageBackgroundSeconds] = duration(
    counters,
    'average_background_time',
    what,
    true,
  );
  return {
    totalSnapshots: integer(counters, 'total_snapshots', what),
    successfulSnapshots: integer(counters, 'successful_snapshots', what),
    failedSnapshots: integer(counters, 'failed_snapshots', what),
    averagePauseTime,
    averageTotalTime,
    averageBackgroundTime,
    averagePauseSeconds,
    averageTotalSeconds,
    averageBackgroundSeconds,
    timestamp: time(string(body, 'timestamp', what), 'timestamp', what),
    raw: body,
  };
}

module.exports = { SnapshotState, snapshotResult, snapshotStatus, snapshotPage, metrics };
