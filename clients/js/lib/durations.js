'use strict';
// Parsing of the two text forms the daemon sends: Go durations and RFC 3339 times.

// Nanoseconds per unit of Go's time.Duration.String(); "µs" is U+00B5 (what Go
// prints), "μs" U+03BC (what Go also accepts).
const UNIT_NANOSECONDS = {
  ns: 1n,
  us: 1000n,
  '\u00b5s': 1000n,
  '\u03bcs': 1000n,
  ms: 1000000n,
  s: 1000000000n,
  m: 60000000000n,
  h: 3600000000000n,
};

// One "<number><unit>" term, anchored where the previous one ended; "ms"
// before "m" so that "5ms" is not "5m" + "s".
const TERM = /([0-9]+)?(?:\.([0-9]*))?(ns|us|\u00b5s|\u03bcs|ms|s|m|h)/y;

/**
 * The seconds of a Go duration string such as "8.72416ms", "512.3µs" or "2m3.5s".
 * Accepts what Go's time.ParseDuration accepts (an optional sign, then one or
 * more number+unit terms, or a bare "0"); throws a RangeError on anything else.
 * Like Go, it counts whole nanoseconds, then divides once, so "512.3µs" is 0.0005123.
 */
function parseGoDuration(text) {
  if (typeof text !== 'string') {
    throw new RangeError(`go duration must be a string, not ${typeof text}`);
  }
  let rest = text;
  let sign = 1;
  if (rest[0] === '+' || rest[0] === '-') {
    sign = rest[0] === '-' ? -1 : 1;
    rest = rest.slice(1);
  }
  if (rest === '0') return 0;
  if (rest === '') throw new RangeError(`invalid go duration ${JSON.stringify(text)}`);
  let nanoseconds = 0n;
  let position = 0;
  while (position < rest.length) {
    TERM.lastIndex = position;
    const term = TERM.exec(rest);
    if (term === null || (term[1] === undefined && !term[2])) {
      throw new RangeError(`invalid go duration ${JSON.stringify(text)}`);
    }
    const unit = UNIT_NANOSECONDS[term[3]];
    nanoseconds += BigInt(term[1] || '0') * unit;
    const fraction = term[2] || '';
    if (fraction) {
      nanoseconds += (BigInt(fraction) * unit) / 10n ** BigInt(fraction.length);
    }
    position = TERM.lastIndex;
  }
  const seconds = Number(nanoseconds) / 1e9;
  return sign * seconds;
}

const RFC3339 =
  /^([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})$/;

/**
 * The Date of an RFC 3339 time ("2025-07-18T16:51:52Z"); fractions finer than
 * milliseconds (the daemon sends nanoseconds) are truncated. Throws a
 * RangeError on anything else, including a time without an offset.
 */
function parseRFC3339(text) {
  const match = typeof text === 'string' ? RFC3339.exec(text) : null;
  if (match === null) {
    throw new RangeError(`invalid rfc 3339 time ${JSON.stringify(text)}`);
  }
  const [, date, clock, fraction, offset] = match;
  const milliseconds = (fraction || '').slice(0, 3).padEnd(3, '0');
  const zone = offset === 'z' ? 'Z' : offset;
  const parsed = new Date(`${date}T${clock}.${milliseconds}${zone}`);
  if (Number.isNaN(parsed.getTime())) {
    throw new RangeError(`invalid rfc 3339 time ${JSON.stringify(text)}`);
  }
  return parsed;
}

module.exports = { parseGoDuration, parseRFC3339 };
