/**
 * Errors of the cloud-hypervisor API client. Each names the socket and the endpoint (`PUT /api/v1/vm.boot`)
 * so that a log line alone says which VMM refused what. The driver maps them to vmenv's errors.
 */

/** Base class: anything the client throws other than the caller's own abort reason. */
export class CloudHypervisorError extends Error {
  override readonly name: string = "CloudHypervisorError";
  readonly socketPath: string;
  /** `METHOD /api/v1/<endpoint>`. */
  readonly endpoint: string;

  constructor(message: string, socketPath: string, endpoint: string, options?: { cause?: unknown }) {
    super(message, options);
    this.socketPath = socketPath;
    this.endpoint = endpoint;
  }
}

/**
 * The VMM answered with a status that is not a success: it refused the request. `body` is its
 * explanation, plain text as cloud-hypervisor sends it (e.g. "Error from API: …").
 */
export class CloudHypervisorApiError extends CloudHypervisorError {
  override readonly name = "CloudHypervisorApiError";
  readonly status: number;
  readonly body: string;

  constructor(socketPath: string, endpoint: string, status: number, body: string) {
    const text = body.trim();
    super(
      `cloud-hypervisor ${endpoint} failed with HTTP ${status}${text === "" ? "" : `: ${text}`}`,
      socketPath,
      endpoint,
    );
    this.status = status;
    this.body = body;
  }
}

/**
 * The API socket could not be connected to: it does not exist (the VMM never started, or exited and
 * removed it), nothing listens on it (the VMM died), or it may not be opened. The request was not sent, so
 * repeating it cannot do harm.
 */
export class CloudHypervisorUnreachableError extends CloudHypervisorError {
  override readonly name = "CloudHypervisorUnreachableError";
  /** The system error code: ENOENT, ECONNREFUSED, EACCES … */
  readonly code: string;

  constructor(socketPath: string, endpoint: string, code: string, cause: unknown) {
    super(
      `cloud-hypervisor API socket ${socketPath} not reachable: ${describeCode(code)} (${endpoint} not sent)`,
      socketPath,
      endpoint,
      { cause },
    );
    this.code = code;
  }
}

/**
 * The request reached the VMM but no usable answer came back: the connection dropped before the answer
 * (the VMM may have acted on the request), a success status the API does not document for this endpoint,
 * or a body that is not the JSON the endpoint documents.
 */
export class CloudHypervisorProtocolError extends CloudHypervisorError {
  override readonly name = "CloudHypervisorProtocolError";
  /** The HTTP status, when an answer came. */
  readonly status: number | undefined;

  constructor(
    socketPath: string,
    endpoint: string,
    what: string,
    status: number | undefined,
    options?: { cause?: unknown },
  ) {
    super(`cloud-hypervisor ${endpoint} on ${socketPath}: ${what}`, socketPath, endpoint, options);
    this.status = status;
  }
}

/** No answer within the call's time limit. The VMM may still carry out the request. */
export class CloudHypervisorTimeoutError extends CloudHypervisorError {
  override readonly name = "CloudHypervisorTimeoutError";
  readonly timeoutMs: number;

  constructor(socketPath: string, endpoint: string, timeoutMs: number) {
    super(
      `cloud-hypervisor ${endpoint} on ${socketPath}: no answer within ${timeoutMs} ms`,
      socketPath,
      endpoint,
    );
    this.timeoutMs = timeoutMs;
  }
}

/** Error codes that mean "never connected". */
export const CONNECT_ERROR_CODES: ReadonlySet<string> = new Set([
  "ENOENT",
  "ECONNREFUSED",
  "EACCES",
  "EPERM",
  "ENOTSOCK",
  "ENOTDIR",
  "ENAMETOOLONG",
]);

function describeCode(code: string): string {
  switch (code) {
    case "ENOENT":
      return "no such socket";
    case "ECONNREFUSED":
      return "connection refused (no VMM listening)";
    case "EACCES":
    case "EPERM":
      return "permission denied";
    case "ENAMETOOLONG":
      return "socket path too long";
    default:
      return code;
  }
}
