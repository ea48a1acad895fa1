'use strict';
// The errors the client throws: one base class, one subclass per code of the REST contract.

/**
 * A failure of a call: an error answer of the daemon, or no usable answer at all.
 * status: the HTTP status (null when there was no answer); code: the contract's
 * code ("CONTAINER_NOT_FOUND", ...) or one of the client's own (CONNECTION_ERROR,
 * INVALID_RESPONSE, WAIT_TIMEOUT, HTTP_<status>); message; details (an object).
 */
class SeamlessSnapshotError extends Error {
  constructor({ status = null, code, message, details = {}, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

// The contract's codes, each with its class (named after the code).
const CODE_CLASSES = {};
const classes = {};
for (const [code, name] of [
  ['INVALID_PARAMETER', 'InvalidParameterError'],
  ['CONTAINER_NOT_FOUND', 'ContainerNotFoundError'],
  ['SNAPSHOT_NOT_FOUND', 'SnapshotNotFoundError'],
  ['PERMISSION_DENIED', 'PermissionDeniedError'],
  ['INTERNAL_ERROR', 'InternalError'],
  ['CONTAINER_NOT_RUNNING', 'ContainerNotRunningError'],
  ['SNAPSHOT_IN_PROGRESS', 'SnapshotInProgressError'],
  ['PAUSE_TIMEOUT', 'PauseTimeoutError'],
  ['ATOMIC_SWITCH_FAILED', 'AtomicSwitchFailedError'],
  ['BACKGROUND_PROCESSING_FAILED', 'BackgroundProcessingFailedError'],
  // The client's own codes.
  ['CONNECTION_ERROR', 'SeamlessConnectionError'],
  ['INVALID_RESPONSE', 'InvalidResponseError'],
  ['WAIT_TIMEOUT', 'WaitTimeoutError'],
]) {
  // A computed class name keeps `error.name` and stack traces readable.
  const cls = { [name]: class extends SeamlessSnapshotError {} }[name];
  CODE_CLASSES[code] = cls;
  classes[name] = cls;
}

/** The error of a code: its class when the contract names it, the base class otherwise. */
function errorOfCode(fields) {
  const cls = CODE_CLASSES[fields.code] || SeamlessSnapshotError;
  return new cls(fields);
}

/**
 * The error of a non-2xx answer, from its decoded JSON body (undefined when not
 * JSON) and its text. An answer without the {"error": {...}} envelope (a
 * proxy's page, say) still throws, with code HTTP_<status>.
 */
function errorFromAnswer(status, body, text) {
  const envelope = body !== null && typeof body === 'object' ? body.error : undefined;
  if (envelope !== null && typeof envelope === 'object' && typeof envelope.code === 'string') {
    const { details } = envelope;
    return errorOfCode({
      status,
      code: envelope.code,
      message: typeof envelope.message === 'string' ? envelope.message : '',
      details: details !== null && typeof details === 'object' && !Array.isArray(details) ? details : {},
    });
  }
  return new SeamlessSnapshotError({
    status,
    code: `HTTP_${status}`,
    message: text.trim() || `http status ${status}`,
  });
}

module.exports = { SeamlessSnapshotError, errorOfCode, errorFromAnswer, ...classes };
