// Type declarations of @nydus/client (the CommonJS module index.js).

/** The states of a snapshot job. */
export declare const SnapshotState: Readonly<{
  PENDING: 'pending';
  PROCESSING: 'processing';
  COMPLETED: 'completed';
  FAILED: 'failed';
}>;
export type SnapshotStateValue = 'pending' | 'processing' | 'completed' | 'failed';

export declare const DEFAULT_SOCKET_PATH: string;
/** Milliseconds one request may take by default. */
export declare const DEFAULT_TIMEOUT: number;

export interface ClientOptions {
  /** http://host:port, https://host:port or unix:///path/rest.sock */
  baseURL?: string;
  /** The daemon's REST unix socket (instead of baseURL). */
  socketPath?: string;
  /** Sent as "Authorization: Bearer <token>" (required by the daemon on TCP). */
  token?: string;
  /** Milliseconds per request (default 600000). */
  timeout?: number;
}

export interface Credentials {
  username: string;
  password: string;
}

export interface CreateOptions {
  workDir?: string;
  fsVersion?: string | number;
  compressor?: string;
  targetInsecure?: boolean;
  sourceInsecure?: boolean;
  withPaths?: string[];
  withoutPaths?: string[];
  maximumTimes?: number;
  backgroundWorkers?: number;
  format?: 'nydus' | 'oci';
  targetCreds?: Credentials;
  sourceCreds?: Credentials;
  /** The wire's snake_case names are accepted too. */
  [wireName: string]: unknown;
}

export interface CreateSnapshotRequest {
  containerId: string;
  targetRef: string;
  wait?: boolean;
  namespace?: string;
  options?: CreateOptions;
}

export interface SnapshotResult {
  snapshotId: string;
  /** Go duration as sent, e.g. "8.72416ms". */
  pauseTime?: string;
  totalTime?: string;
  oldUpperDir?: string;
  newUpperDir?: string;
  pauseSeconds?: number;
  totalSeconds?: number;
  state?: SnapshotStateValue;
  raw: Record<string, unknown>;
}

export interface SnapshotStatus {
  snapshotId: string;
  state: SnapshotStateValue;
  progress: number;
  startTime: Date;
  endTime: Date | null;
  error?: string;
  /** True once completed or failed. */
  ended: boolean;
  raw: Record<string, unknown>;
}

export interface SnapshotPage {
  snapshots: SnapshotStatus[];
  total: number;
  limit: number;
  offset: number;
  raw: Record<string, unknown>;
}

export interface Metrics {
  totalSnapshots: number;
  successfulSnapshots: number;
  failedSnapshots: number;
  averagePauseTime: string;
  averageTotalTime: string;
  averageBackgroundTime: string;
  averagePauseSeconds: number;
  averageTotalSeconds: number;
  averageBackgroundSeconds: number;
  timestamp: Date;
  raw: Record<string, unknown>;
}

export declare class SeamlessSnapshotClient {
  constructor(options?: ClientOptions);
  /** Where requests go, as a url (unix:///... or http://...). */
  readonly endpoint: string;
  createSnapshot(request: CreateSnapshotRequest): Promise<SnapshotResult>;
  getSnapshot(snapshotId: string): Promise<SnapshotStatus>;
  listSnapshots(query?: { state?: SnapshotStateValue; limit?: number; offset?: number }): Promise<SnapshotPage>;
  metrics(): Promise<Metrics>;
  prometheusMetrics(): Promise<string>;
  /** Resolves to the final status (completed or failed); milliseconds. */
  waitFor(snapshotId: string, options?: { timeout?: number; interval?: number }): Promise<SnapshotStatus>;
}

export interface ErrorFields {
  status?: number | null;
  code: string;
  message: string;
  details?: Record<string, unknown>;
  cause?: unknown;
}

export declare class SeamlessSnapshotError extends Error {
  constructor(fields: ErrorFields);
  /** HTTP status; null when no answer came. */
  status: number | null;
  code: string;
  details: Record<string, unknown>;
}
export declare class InvalidParameterError extends SeamlessSnapshotError {}
export declare class ContainerNotFoundError extends SeamlessSnapshotError {}
export declare class SnapshotNotFoundError extends SeamlessSnapshotError {}
export declare class PermissionDeniedError extends SeamlessSnapshotError {}
export declare class InternalError extends SeamlessSnapshotError {}
export declare class ContainerNotRunningError extends SeamlessSnapshotError {}
export declare class SnapshotInProgressError extends SeamlessSnapshotError {}
export declare class PauseTimeoutError extends SeamlessSnapshotError {}
export declare class AtomicSwitchFailedError extends SeamlessSnapshotError {}
export declare class BackgroundProcessingFailedError extends SeamlessSnapshotError {}
export declare class SeamlessConnectionError extends SeamlessSnapshotError {}
export declare class InvalidResponseError extends SeamlessSnapshotError {}
export declare class WaitTimeoutError extends SeamlessSnapshotError {}

/** Seconds of a Go duration string ("8.72416ms", "512.3µs", "2m3.5s"); throws RangeError otherwise. */
export declare function parseGoDuration(text: string): number;
/** The Date of an RFC 3339 time; throws RangeError otherwise. */
export declare function parseRFC3339(text: string): Date;
