'use strict';
// parseGoDuration and parseRFC3339 against the forms Go's time.Duration.String() and RFC 3339 produce.

const test = require('node:test');
const assert = require('node:assert');
const { parseGoDuration, parseRFC3339 } = require('..');

test('every unit and compound of a Go duration', () => {
  const cases = {
    '0s': 0,
    0: 0,
    '250ns': 250e-9,
    '1.5us': 1.5e-6,
    '512.3\u00b5s': 0.0005123, // micro sign, what Go prints
    '512.3\u03bcs': 0.0005123, // greek mu, what Go also accepts
    '8.72416ms': 0.00872416,
    '22.802283ms': 0.022802283,
    '25.3ms': 0.0253,
    '1.5s': 1.5,
    '58.7s': 58.7,
    '2m3.5s': 123.5,
    '1h0m0s': 3600,
    '1h2m3.004005006s': 3723.004005006,
    '.5s': 0.5,
    '1.s': 1,
    '-1.5h': -5400,
    '+3m': 180,
  };
  for (const [text, seconds] of Object.entries(cases)) {
    assert.strictEqual(parseGoDuration(text), seconds, text);
  }
});

test('what Go rejects is rejected', () => {
  for (const text of ['', 's', '1', '1.5', '-', '.s', '1x', '1m s', ' 1s', '1s ', '1S', '1 ms', '1.2.3s', 'ms']) {
    assert.throws(() => parseGoDuration(text), RangeError, JSON.stringify(text));
  }
  assert.throws(() => parseGoDuration(1.5), RangeError);
});

test('RFC 3339 times: UTC, offsets, nanosecond fractions', () => {
  assert.strictEqual(parseRFC3339('2025-07-18T16:51:52Z').toISOString(), '2025-07-18T16:51:52.000Z');
  assert.strictEqual(parseRFC3339('2025-07-18T16:51:52.123456789Z').toISOString(), '2025-07-18T16:51:52.123Z');
  assert.strictEqual(parseRFC3339('2025-07-18t16:51:52.5+02:00').toISOString(), '2025-07-18T14:51:52.500Z');
  for (const text of ['2025-07-18T16:51:52', '2025-07-18', 'yesterday', '2025-07-18T16:51:52Zjunk', null]) {
    assert.throws(() => parseRFC3339(text), RangeError, String(text));
  }
});
