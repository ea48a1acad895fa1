'use strict';
// @nydus/client: a client of the seamless-snapshotter REST API (seamless commits of running
// containers), with Node's built-in http/https only.

const { SeamlessSnapshotClient, DEFAULT_SOCKET_PATH, DEFAULT_TIMEOUT } = require('./lib/client');
const { parseGoDuration, parseRFC3339 } = require('./lib/durations');
const { errorOfCode, errorFromAnswer, ...errors } = require('./lib/errors');
const { SnapshotState } = require('./lib/models');

module.exports = {
  SeamlessSnapshotClient,
  DEFAULT_SOCKET_PATH,
  DEFAULT_TIMEOUT,
  SnapshotState,
  parseGoDuration,
  parseRFC3339,
  ...errors,
};
