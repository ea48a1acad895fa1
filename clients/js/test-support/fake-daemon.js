'use strict';
// A fake of the daemon's REST API for the offline tests: records each request, answers from a script.
// Kept out of test/ so that `node --test clients/js/test/` does not run it as a test file.

const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

class FakeDaemon {
  /** Listens on a unix socket in a fresh temporary directory, or ({ tcp: true }) on 127.0.0.1. */
  static async start({ tcp = false } = {}) {
    const daemon = new FakeDaemon();
    await daemon._listen(tcp);
    return daemon;
  }

  constructor() {
    this.requests = [];
    this._answers = new Map();
    this._fallback = undefined;
    this._server = http.createServer((request, response) => this._serve(request, response));
  }

  async _listen(tcp) {
    if (tcp) {
      await new Promise((resolve) => this._server.listen(0, '127.0.0.1', resolve));
      this.baseURL = `http://127.0.0.1:${this._server.address().port}`;
      return;
    }
    this._directory = fs.mkdtempSync(path.join(os.tmpdir(), 'fake-seamless-'));
    this.socketPath = path.join(this._directory, 'rest.sock');
    await new Promise((resolve) => this._server.listen(this.socketPath, resolve));
    this.baseURL = `unix://${this.socketPath}`;
  }

  async close() {
    this._server.closeAllConnections?.();
    await new Promise((resolve) => this._server.close(resolve));
    if (this._directory) fs.rmSync(this._directory, { recursive: true, force: true });
  }

  /** Answer method+path (query included) with `answers` in turn, the last one repeating. */
  on(method, path, ...answers) {
    this._answers.set(`${method} ${path}`, answers);
  }

  /** Answer every request no `on` names with `answer(request)`. */
  onAny(answer) {
    this._fallback = answer;
  }

  _serve(request, response) {
    const chunks = [];
    request.on('data', (chunk) => chunks.push(chunk));
    request.on('end', () => {
      const body = Buffer.concat(chunks).toString('utf8');
      const recorded = {
        method: request.method,
        path: request.url,
        headers: request.headers,
        body,
        json: () => JSON.parse(body),
      };
      this.requests.push(recorded);
      const scripted = this._answers.get(`${request.method} ${request.url}`);
      let answer;
      if (scripted) answer = scripted.length > 1 ? scripted.shift() : scripted[0];
      else if (this._fallback) answer = this._fallback(recorded);
      else answer = [599, 'no scripted answer'];
      const [status, payload] = answer;
      const text = typeof payload === 'string' ? payload : JSON.stringify(payload);
      response.writeHead(status, {
        'Content-Type': typeof payload === 'string' ? 'text/plain; version=0.0.4' : 'application/json',
        'Content-Length': Buffer.byteLength(text),
      });
      response.end(text);
    });
  }
}

/** An error answer of the contract. */
function errorAnswer(status, code, message = 'm', details = {}) {
  return [status, { error: { code, message, details } }];
}

module.exports = { FakeDaemon, errorAnswer };
