import { unlink } from "node:fs/promises";
import type * as net from "node:net";
import type { DescService } from "@bufbuild/protobuf";
import type { GenFile } from "@bufbuild/protobuf/codegenv2";
import { Code, ConnectError, type Interceptor, type ServiceImpl } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { allFiles } from "@vmenv/api";
import type { Logger } from "pino";
import { errorMapperInterceptor } from "./error-mapper.js";
import { unimplemented } from "./errors.js";
import { Health, HealthRegistry, healthService, ServingStatus } from "./health.js";
import { deadlineInterceptor, loggingInterceptor } from "./interceptors.js";
import { HttpFront, listenTcp, listenUnix, reject, type TlsServerConfig } from "./listen.js";
import { DescriptorIndex, ReflectionV1, ReflectionV1alpha, reflectionServices } from "./reflection.js";
import { requestIdInterceptor } from "./request-id.js";

/** A service and its implementation. Methods left out answer UNIMPLEMENTED. */
export interface ServiceBinding {
  service: DescService;
  // biome-ignore lint/suspicious/noExplicitAny: implementations of heterogeneous services
  impl: Partial<ServiceImpl<any>>;
}

/** Binds `service` to `impl` with its types checked. */
export function bind<S extends DescService>(service: S, impl: Partial<ServiceImpl<S>>): ServiceBinding {
  return { service, impl };
}

/**
 * Binds `service` so that every method answers UNIMPLEMENTED with `detail` (say, which issue brings
 * it), naming the method: a clear answer for API surface that exists before its implementation.
 */
export function unimplementedService(service: DescService, detail: string): ServiceBinding {
  // biome-ignore lint/suspicious/noExplicitAny: one implementation for every method
  const impl: Record<string, any> = {};
  for (const m of service.methods) {
    const fail = () => {
      throw unimplemented(`${service.typeName}/${m.name}`, detail);
    };
    impl[m.localName] =
      m.methodKind === "server_streaming" || m.methodKind === "bidi_streaming"
        ? // biome-ignore lint/correctness/useYield: throws before its first message
          async function* () {
            fail();
          }
        : fail;
  }
  return { service, impl };
}

export interface ServeOptions {
  services: ServiceBinding[];
  logger: Logger;
  /** Unix socket to listen on (mode 0660 unless `mode` says otherwise). */
  unixSocket?: { path: string; mode?: number };
  /** TCP address to listen on; h2c + HTTP/1.1 without `tls`, TLS (ALPN h2 and http/1.1) with it. */
  tcp?: { host: string; port: number; tls?: TlsServerConfig };
  /** File descriptors reflection serves besides those of `services`; default: the whole vmenv API. */
  files?: readonly GenFile[];
  /** Deadline of a unary call whose client set none. Default 5 minutes. */
  defaultUnaryTimeoutMs?: number;
  /** Interceptors run inside the standard ones (request id, logging, shutdown, deadline, error mapping). */
  interceptors?: Interceptor[];
}

export interface RpcServer {
  /** Path of the Unix socket, when listening on one. */
  readonly unixSocket: string | undefined;
  /** `host:port` the TCP listener is bound to, when listening on TCP. */
  readonly tcpAddress: string | undefined;
  /** Serving status of every service; see grpc.health.v1. */
  readonly health: HealthRegistry;
  /** Calls in flight right now. */
  inFlight(): number;
  /**
   * Graceful shutdown: stop accepting connections, report NOT_SERVING, end streams with UNAVAILABLE
   * at once, let unary calls finish for up to `graceMs`, then abort what is left and close every
   * connection.
   */
  close(graceMs?: number): Promise<void>;
}

/** Serves `services` (plus health and reflection) with the same handlers on every listener. */
export async function serve(opts: ServeOptions): Promise<RpcServer> {
  const health = new HealthRegistry();
  const bindings = [...opts.services];
  const reflected = [...bindings.map((b) => b.service), Health, ReflectionV1, ReflectionV1alpha];
  const index = new DescriptorIndex(opts.files ?? allFiles, reflected);
  const reflection = reflectionServices(index);

  const shutdown = new AbortController();
  const tracker = new CallTracker();
  const handler = connectNodeAdapter({
    routes: (router) => {
      for (const b of bindings) router.service(b.service, b.impl);
      router.service(Health, healthService(health));
      router.service(ReflectionV1, reflection.v1);
      router.service(ReflectionV1alpha, reflection.v1alpha);
    },
    interceptors: [
      requestIdInterceptor(),
      loggingInterceptor(opts.logger),
      tracker.interceptor(),
      deadlineInterceptor(opts.defaultUnaryTimeoutMs ?? 300_000),
      errorMapperInterceptor(opts.logger),
      ...(opts.interceptors ?? []),
    ],
    shutdownSignal: shutdown.signal,
    fallback: unknownMethod,
  });

  const fronts: HttpFront[] = [];
  const listeners: net.Server[] = [];
  let unixSocket: string | undefined;
  let tcpAddress: string | undefined;
  try {
    if (opts.unixSocket) {
      const front = new HttpFront(handler);
      listeners.push(await listenUnix(front, opts.unixSocket.path, opts.unixSocket.mode));
      fronts.push(front);
      unixSocket = opts.unixSocket.path;
    }
    if (opts.tcp) {
      const front = new HttpFront(handler, opts.tcp.tls);
      const l = await listenTcp(front, opts.tcp.host, opts.tcp.port);
      listeners.push(l.server);
      fronts.push(front);
      tcpAddress = l.address;
    }
  } catch (err) {
    for (const l of listeners) l.close();
    if (unixSocket) await unlink(unixSocket).catch(() => undefined);
    throw err;
  }

  health.set("", ServingStatus.SERVING);
  for (const s of reflected) health.set(s.typeName, ServingStatus.SERVING);

  let closing: Promise<void> | undefined;
  const close = (graceMs = 5000) =>
    (closing ??= (async () => {
      health.setAll(ServingStatus.NOT_SERVING);
      const closed = listeners.map((l) => new Promise<void>((resolve) => l.close(() => resolve())));
      for (const f of fronts) {
        for (const s of f.sessions) s.close(); // GOAWAY: no new streams, running ones go on
        f.h1?.closeIdleConnections();
      }
      const unavailable = new ConnectError("server is shutting down", Code.Unavailable);
      const deadline = Date.now() + graceMs;
      tracker.endStreams(unavailable);
      await tracker.drained(graceMs);
      // Calls still running now are aborted; they answer UNAVAILABLE.
      shutdown.abort(unavailable);
      await tracker.drained(250);
      // Let the last responses reach the wire: sessions that got GOAWAY close once their streams end.
      for (const f of fronts) f.h1?.closeIdleConnections();
      await connectionsClosed(fronts, Math.max(250, deadline - Date.now()));
      for (const f of fronts) {
        for (const s of f.sessions) s.destroy();
        for (const s of f.sockets) s.destroy();
        f.h1?.closeAllConnections();
      }
      await Promise.all(closed);
      if (unixSocket) await unlink(unixSocket).catch(() => undefined);
    })());

  return { unixSocket, tcpAddress, health, inFlight: () => tracker.count, close };
}

/** Answers a request for a method this server does not have, in the caller's protocol. */
const unknownMethod: NonNullable<Parameters<typeof connectNodeAdapter>[0]["fallback"]> = (req, res) => {
  const path = (req.url ?? "").split("?")[0] ?? "";
  reject(
    req,
    // connect-node's response type differs from Node's only in the types of write callbacks.
    res as Parameters<typeof reject>[1],
    Code.Unimplemented,
    `unknown method ${path}: this server has no such service or method (list them with reflection)`,
  );
};

/** Resolves when every connection of `fronts` has closed, or after `ms`. */
function connectionsClosed(fronts: HttpFront[], ms: number): Promise<void> {
  const open = () => fronts.some((f) => f.sessions.size > 0 || f.sockets.size > 0);
  return new Promise((resolve) => {
    const started = Date.now();
    const poll = () => {
      if (!open() || Date.now() - started >= ms) resolve();
      else setTimeout(poll, 10);
    };
    poll();
  });
}

/** Counts calls in flight and lets shutdown end streams and wait for unary calls. */
class CallTracker {
  count = 0;
  readonly #streams = new Set<AbortController>();
  #idle: (() => void)[] = [];

  interceptor(): Interceptor {
    return (next) => async (req) => {
      this.count++;
      const stream = new AbortController();
      if (req.method.methodKind !== "unary") this.#streams.add(stream);
      const signal = AbortSignal.any([req.signal, stream.signal]);
      let res: Awaited<ReturnType<typeof next>>;
      try {
        res = await next({ ...req, signal });
      } catch (err) {
        this.#done(stream);
        throw err;
      }
      if (!res.stream) {
        this.#done(stream);
        return res;
      }
      const it = res.message[Symbol.asyncIterator]();
      const aborted = new Promise<never>((_, reject) =>
        signal.addEventListener("abort", () => reject(ConnectError.from(signal.reason)), { once: true }),
      );
      aborted.catch(() => undefined);
      const self = this;
      return {
        ...res,
        message: (async function* () {
          try {
            for (;;) {
              const r = await Promise.race([it.next(), aborted]);
              if (r.done) return;
              yield r.value;
            }
          } finally {
            it.return?.().catch(() => undefined);
            self.#done(stream);
          }
        })(),
      };
    };
  }

  #done(stream: AbortController): void {
    this.#streams.delete(stream);
    this.count--;
    if (this.count === 0) for (const f of this.#idle.splice(0)) f();
  }

  /** Ends every stream in flight with `reason`. Unary calls are not touched. */
  endStreams(reason: ConnectError): void {
    for (const c of this.#streams) c.abort(reason);
  }

  /** Resolves when no call is in flight, or after `ms`. */
  drained(ms: number): Promise<void> {
    if (this.count === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      this.#idle.push(() => {
        clearTimeout(t);
        resolve();
      });
    });
  }
}
