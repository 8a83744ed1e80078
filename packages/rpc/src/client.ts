import { randomUUID } from "node:crypto";
import * as net from "node:net";
import type { DescMessage, DescService } from "@bufbuild/protobuf";
import {
  type Client,
  Code,
  ConnectError,
  createClient,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { REQUEST_ID_HEADER } from "./request-id.js";

/** TLS settings of a client, PEM-encoded. */
export interface TlsClientConfig {
  /** CA bundle the server certificate must chain to (default: the system's). */
  ca?: string | Buffer;
  /** Client certificate and key, for servers that require mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** Name to verify the server certificate against, when it differs from the address's host. */
  serverName?: string;
}

export interface RetryPolicy {
  /** Attempts in all, the first included. */
  maxAttempts: number;
  initialBackoffMs: number;
  maxBackoffMs: number;
}

export interface ClientConfig {
  /** Unix socket of a daemon on this host. Exactly one of `socket` and `address`. */
  socket?: string;
  /** `host:port` of a daemon's TCP listener. */
  address?: string;
  /** TLS for `address`; without it the connection is plain HTTP/2 (h2c). */
  tls?: TlsClientConfig;
  /** Deadline of each call unless the call sets its own. Default 30 s. */
  timeoutMs?: number;
  /** Retry of calls that failed with a retry-safe code; `false` turns it off. */
  retry?: RetryPolicy | false;
}

export const DEFAULT_RETRY: RetryPolicy = { maxAttempts: 4, initialBackoffMs: 50, maxBackoffMs: 1000 };

/** A gRPC transport to a vmenv daemon (agent or coordinator) over its Unix socket or TCP. */
export function createDaemonTransport(cfg: ClientConfig): Transport {
  if ((cfg.socket === undefined) === (cfg.address === undefined)) {
    throw new Error("give exactly one of a Unix socket path and a TCP address");
  }
  const target = cfg.socket !== undefined ? `unix:${cfg.socket}` : (cfg.address as string);
  const interceptors = [
    requestIdClientInterceptor(),
    ...(cfg.retry === false ? [] : [retryInterceptor(cfg.retry ?? DEFAULT_RETRY)]),
    connectionErrorInterceptor(target),
  ];
  const common = { httpVersion: "2" as const, defaultTimeoutMs: cfg.timeoutMs ?? 30_000, interceptors };
  if (cfg.socket !== undefined) {
    const path = cfg.socket;
    return createGrpcTransport({
      ...common,
      baseUrl: "http://localhost",
      nodeOptions: { createConnection: () => net.connect({ path }) },
    });
  }
  const address = cfg.address as string;
  if (!/^(\[[0-9a-fA-F:.]+\]|[^:[\]\s/]+):\d+$/.test(address)) {
    throw new Error(`address "${address}" is not of the form host:port`);
  }
  if (!cfg.tls) return createGrpcTransport({ ...common, baseUrl: `http://${address}` });
  const { ca, cert, key, serverName } = cfg.tls;
  return createGrpcTransport({
    ...common,
    baseUrl: `https://${address}`,
    nodeOptions: {
      ...(ca === undefined ? {} : { ca }),
      ...(cert === undefined ? {} : { cert }),
      ...(key === undefined ? {} : { key }),
      // SNI carries host names only (RFC 6066): none when the address is an IP and no name is given.
      ...(serverName !== undefined
        ? { servername: serverName }
        : net.isIP(address.replace(/^\[|\]?:\d+$/g, "")) !== 0
          ? { servername: "" }
          : {}),
    },
  });
}

/** A typed client of `service` on a daemon. */
export function createDaemonClient<S extends DescService>(
  service: S,
  cfg: ClientConfig | Transport,
): Client<S> {
  return createClient(service, "unary" in cfg ? cfg : createDaemonTransport(cfg));
}

const connectionErrors: Record<string, string> = {
  ENOENT: "no such socket",
  ECONNREFUSED: "connection refused",
  ECONNRESET: "connection reset",
  EPIPE: "connection closed",
  ENOTFOUND: "host not found",
  EHOSTUNREACH: "host unreachable",
  ENETUNREACH: "network unreachable",
  ETIMEDOUT: "connection timed out",
  EACCES: "permission denied on the socket",
};

/** Errors of calls that never reached the daemon: always safe to send again. */
const unsent = new WeakSet<ConnectError>();
/** Errors no retry can mend (a failed TLS handshake). */
const permanent = new WeakSet<ConnectError>();
const unsentErrnos = new Set(["ENOENT", "ECONNREFUSED", "ENOTFOUND", "EHOSTUNREACH", "ENETUNREACH"]);

/** Failures to reach the daemon are UNAVAILABLE (the call never ran), with a message naming the target. */
function connectionErrorInterceptor(target: string): Interceptor {
  return (next) => async (req) => {
    try {
      return await next(req);
    } catch (err) {
      for (let c: unknown = err; c instanceof Error; c = c.cause) {
        const rawCode: unknown = (c as { code?: unknown }).code;
        const errno = typeof rawCode === "string" ? rawCode : undefined;
        if (errno && (errno.startsWith("ERR_SSL_") || errno.startsWith("ERR_TLS_") || /CERT/.test(errno))) {
          // The TLS handshake failed: retrying cannot help, the configuration must change.
          // OpenSSL's messages ("80DC…:error:0A00045C:SSL routines:…") say less than their code does.
          const why = /SSL routines/.test(c.message)
            ? errno
                .replace(/^ERR_(SSL|TLS)_/, "")
                .toLowerCase()
                .replaceAll("_", " ")
            : c.message;
          const e = new ConnectError(
            `cannot reach ${target}: TLS handshake failed: ${why}`,
            Code.Unavailable,
            undefined,
            undefined,
            err,
          );
          permanent.add(e);
          throw e;
        }
        const what = errno === undefined ? undefined : connectionErrors[errno];
        if (what) {
          const code = errno === "EACCES" ? Code.PermissionDenied : Code.Unavailable;
          const e = new ConnectError(`cannot reach ${target}: ${what}`, code, undefined, undefined, err);
          if (unsentErrnos.has(errno as string)) unsent.add(e);
          throw e;
        }
      }
      throw err;
    }
  };
}

function requestIdClientInterceptor(): Interceptor {
  return (next) => (req) => {
    if (!req.header.has(REQUEST_ID_HEADER)) req.header.set(REQUEST_ID_HEADER, randomUUID());
    return next(req);
  };
}

/**
 * Whether a call that failed with `code` may be sent again. UNAVAILABLE means the server did not take
 * the call or could not finish it; sending it again is safe when the call never reached the server, when
 * the method has no side effects or is idempotent, or when the request carries a `request_id` the
 * server replays from.
 */
export function isRetrySafe(
  err: ConnectError,
  method: { idempotency: number; input: DescMessage },
  message: unknown,
): boolean {
  if (err.code !== Code.Unavailable || permanent.has(err)) return false;
  if (unsent.has(err)) return true;
  // MethodOptions.IdempotencyLevel: 1 = NO_SIDE_EFFECTS, 2 = IDEMPOTENT.
  if (method.idempotency === 1 || method.idempotency === 2) return true;
  const requestId = (message as { requestId?: unknown }).requestId;
  return typeof requestId === "string" && requestId !== "";
}

/** Retries unary calls that failed with a retry-safe code, with capped exponential backoff and jitter. */
export function retryInterceptor(policy: RetryPolicy): Interceptor {
  return (next) => async (req) => {
    if (req.stream) return next(req);
    for (let attempt = 1; ; attempt++) {
      try {
        return await next(req);
      } catch (err) {
        const e = ConnectError.from(err);
        if (attempt >= policy.maxAttempts || req.signal.aborted || !isRetrySafe(e, req.method, req.message)) {
          throw err;
        }
        const cap = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * 2 ** (attempt - 1));
        await sleep(cap / 2 + Math.random() * (cap / 2), req.signal);
      }
    }
  };
}

/** Resolves after `ms`, or as soon as `signal` aborts (it never rejects). */
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}
