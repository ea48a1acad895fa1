'use strict';
// SeamlessSnapshotClient: the REST API of seamless-snapshotter over TCP or the daemon's unix socket,
// with Node's own http/https only.

const http = require('node:http');
const https = require('node:https');
const { errorFromAnswer, errorOfCode } = require('./errors');
const models = require('./models');

const DEFAULT_SOCKET_PATH = '/run/containerd-seamless/rest.sock';
// Milliseconds one request may take; a create with wait: true answers only
// when the commit (push included) has ended, so this is generous.
const DEFAULT_TIMEOUT = 600000;

// The create options of the contract, by their camelCase and their wire names.
const OPTION_NAMES = {
  workDir: 'work_dir',
  fsVersion: 'fs_version',
  compressor: 'compressor',
  targetInsecure: 'target_insecure',
  sourceInsecure: 'source_insecure',
  withPaths: 'with_paths',
  withoutPaths: 'without_paths',
  maximumTimes: 'maximum_times',
  backgroundWorkers: 'background_workers',
  format: 'format',
  targetCreds: 'target_creds',
  sourceCreds: 'source_creds',
};
for (const wire of Object.values({ ...OPTION_NAMES })) OPTION_NAMES[wire] = wire;

class SeamlessSnapshotClient {
  /**
   * Exactly one transport:
   *   { baseURL: 'http://127.0.0.1:8089', token }   TCP (the daemon requires the token there)
   *   { baseURL: 'unix:///run/.../rest.sock' }      the daemon's unix socket
   *   { socketPath: '/run/.../rest.sock' }          the same
   * With neither, DEFAULT_SOCKET_PATH. timeout: milliseconds per request.
   */
  constructor({ baseURL, socketPath, token, timeout = DEFAULT_TIMEOUT } = {}) {
    if (baseURL !== undefined && socketPath !== undefined) {
      throw new TypeError('give baseURL or socketPath, not both');
    }
    this._token = token;
    this._timeout = timeout;
    this._socketPath = undefined;
    this._transport = http;
    this._host = undefined;
    this._port = undefined;
    this._prefix = '';
    if (baseURL === undefined) {
      this._socketPath = socketPath || DEFAULT_SOCKET_PATH;
      return;
    }
    let url;
    try {
      url = new URL(baseURL);
    } catch {
      throw new TypeError(`baseURL is not a url: ${JSON.stringify(baseURL)}`);
    }
    if (url.protocol === 'unix:') {
      const path = decodeURIComponent(url.pathname);
      if (url.host || !path || path === '/') {
        throw new TypeError(`unix url needs an absolute socket path (unix:///path): ${JSON.stringify(baseURL)}`);
      }
      this._socketPath = path;
    } else if (url.protocol === 'http:' || url.protocol === 'https:') {
      this._transport = url.protocol === 'https:' ? https : http;
      this._host = url.hostname.replace(/^\[(.*)\]$/, '$1');
      this._port = url.port || undefined;
      this._prefix = url.pathname.replace(/\/+$/, '');
      this._origin = `${url.protocol}//${url.host}${this._prefix}`;
    } else {
      throw new TypeError(`baseURL must be http://, https:// or unix://, not ${JSON.stringify(baseURL)}`);
    }
  }

  /** Where the client sends its requests, as a url. */
  get endpoint() {
    return this._socketPath !== undefined ? `unix://${this._socketPath}` : this._origin;
  }

  /**
   * Commit the running container `containerId` and push it as `targetRef`.
   * wait: true answers when the job has ended (an error when it failed); false
   * answers once the container runs again, the push going on in the background.
   * options: workDir, fsVersion, compressor, targetInsecure, sourceInsecure,
   * withPaths, withoutPaths, maximumTimes, backgroundWorkers, format,
   * targetCreds/sourceCreds ({ username, password }); the wire's snake_case
   * names are accepted too. Options left out (or undefined/null) take the daemon's defaults.
   */
  async createSnapshot({ containerId, targetRef, wait = false, namespace, options = {} } = {}) {
    if (typeof containerId !== 'string' || containerId === '') throw new TypeError('containerId is required');
    if (typeof targetRef !== 'string' || targetRef === '') throw new TypeError('targetRef is required');
    const wireOptions = { wait: Boolean(wait) };
    for (const [name, value] of Object.entries(options)) {
      const wire = OPTION_NAMES[name];
      if (wire === undefined) throw new TypeError(`unknown createSnapshot option ${JSON.stringify(name)}`);
      if (value === undefined || value === null) continue;
      wireOptions[wire] = checkedOption(wire, value);
    }
    const body = { container_id: containerId, target_ref: targetRef, options: wireOptions };
    if (namespace !== undefined && namespace !== null) body.namespace = namespace;
    const { status, json } = await this._json('POST', '/api/v1/snapshots', body);
    return typed(models.snapshotResult, status, json);
  }

  /** The state of one snapshot job; a SnapshotNotFoundError (404) when the daemon has none of that id. */
  async getSnapshot(snapshotId) {
    if (typeof snapshotId !== 'string' || snapshotId === '') throw new TypeError('snapshotId is required');
    const { status, json } = await this._json('GET', `/api/v1/snapshots/${encodeURIComponent(snapshotId)}`);
    return typed(models.snapshotStatus, status, json);
  }

  /** One page of snapshot jobs, optionally only those in `state`. */
  async listSnapshots({ state, limit, offset } = {}) {
    const query = new URLSearchParams();
    if (state !== undefined && state !== null) {
      if (!Object.values(models.SnapshotState).includes(state)) {
        throw new TypeError(`unknown snapshot state ${JSON.stringify(state)}`);
      }
      query.set('state', state);
    }
    if (limit !== undefined && limit !== null) query.set('limit', String(Math.trunc(limit)));
    if (offset !== undefined && offset !== null) query.set('offset', String(Math.trunc(offset)));
    const search = query.toString();
    const { status, json } = await this._json('GET', `/api/v1/snapshots${search ? `?${search}` : ''}`);
    return typed(models.snapshotPage, status, json);
  }

  /** Counters and average durations of the daemon's snapshots. */
  async metrics() {
    const { status, json } = await this._json('GET', '/api/v1/metrics');
    return typed(models.metrics, status, json);
  }

  /** The Prometheus text exposition of GET /metrics. */
  async prometheusMetrics() {
    const { text } = await this._request('GET', '/metrics', undefined, 'text/plain');
    return text;
  }

  /**
   * Poll getSnapshot every `interval` ms until the job is completed or failed;
   * resolves to the last status (check .state: a failed job resolves, it does not
   * reject), rejects with a WaitTimeoutError when `timeout` ms pass first.
   */
  async waitFor(snapshotId, { timeout = 600000, interval = 500 } = {}) {
    const deadline = Date.now() + timeout;
    for (;;) {
      const status = await this.getSnapshot(snapshotId);
      if (status.ended) return status;
      const remaining = deadline - Date.now();
      if (remaining <= 0) {
        throw errorOfCode({
          code: 'WAIT_TIMEOUT',
          message: `snapshot ${snapshotId} still ${status.state} after ${timeout}ms`,
          details: { snapshot_id: snapshotId, state: status.state },
        });
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(interval, remaining)));
    }
  }

  async _json(method, path, body) {
    const { status, text } = await this._request(method, path, body, 'application/json');
    try {
      return { status, json: JSON.parse(text) };
    } catch {
      throw errorOfCode({
        status,
        code: 'INVALID_RESPONSE',
        message: `${method} ${path}: answer is not json: ${JSON.stringify(text.slice(0, 200))}`,
      });
    }
  }

  /** Send one request; resolve to { status, text } of a 2xx answer, reject for anything else. */
  _request(method, path, body, accept) {
    const headers = { Accept: accept };
    let payload;
    if (body !== undefined) {
      payload = Buffer.from(JSON.stringify(body), 'utf8');
      headers['Content-Type'] = 'application/json';
      headers['Content-Length'] = String(payload.length);
    }
    if (this._token !== undefined && this._token !== null) headers.Authorization = `Bearer ${this._token}`;
    const target =
      this._socketPath !== undefined
        ? { socketPath: this._socketPath, host: 'localhost' }
        : { host: this._host, port: this._port };
    const where = `${method} ${path} to ${this.endpoint}`;
    return new Promise((resolve, reject) => {
      // agent: false, one connection per request: nothing kept open between calls.
      const request = this._transport.request(
        { ...target, method, path: this._prefix + path, headers, agent: false },
        (response) => {
          const chunks = [];
          response.on('data', (chunk) => chunks.push(chunk));
          response.on('error', (error) => reject(connectionError(where, error)));
          response.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            const status = response.statusCode;
            if (status >= 200 && status < 300) {
              resolve({ status, text });
              return;
            }
            let decoded;
            try {
              decoded = JSON.parse(text);
            } catch {
              decoded = undefined;
            }
            reject(errorFromAnswer(status, decoded, text));
          });
        },
      );
      request.setTimeout(this._timeout, () => {
        request.destroy(new Error(`no answer within ${this._timeout}ms`));
      });
      request.on('error', (error) => reject(connectionError(where, error)));
      request.end(payload);
    });
  }
}

function connectionError(where, error) {
  return errorOfCode({
    code: 'CONNECTION_ERROR',
    message: `${where} failed: ${error.code ? `${error.code}: ` : ''}${error.message}`,
    cause: error,
  });
}

function typed(build, status, json) {
  try {
    return build(json);
  } catch (error) {
    if (error.code === 'INVALID_RESPONSE') error.status = status;
    throw error;
  }
}

function checkedOption(wire, value) {
  if (wire === 'target_creds' || wire === 'source_creds') {
    const keys = value !== null && typeof value === 'object' ? Object.keys(value).sort() : [];
    if (keys.join(',') !== 'password,username') {
      throw new TypeError(`${wire} needs exactly { username, password }`);
    }
    return { username: value.username, password: value.password };
  }
  if (wire === 'with_paths' || wire === 'without_paths') {
    if (!Array.isArray(value)) throw new TypeError(`${wire} must be an array of paths`);
    return [...value];
  }
  return value;
}

module.exports = { SeamlessSnapshotClient, DEFAULT_SOCKET_PATH, DEFAULT_TIMEOUT };
