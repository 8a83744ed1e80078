import { chmod, lstat, mkdir, unlink } from "node:fs/promises";
import * as http from "node:http";
import * as http2 from "node:http2";
import * as net from "node:net";
import { dirname } from "node:path";
import type * as tls from "node:tls";
import { Code } from "@connectrpc/connect";
import { VmenvError } from "./errors.js";

/** TLS material for a TCP listener, PEM-encoded. */
export interface TlsServerConfig {
  cert: string | Buffer;
  key: string | Buffer;
  /** CA bundle that client certificates must chain to. */
  clientCa?: string | Buffer;
  /** Refuse clients that present no valid certificate signed by `clientCa`. */
  requireClientCert?: boolean;
}

type Request = http.IncomingMessage | http2.Http2ServerRequest;
type Response = http.ServerResponse | http2.Http2ServerResponse;
export type Handler = (req: Request, res: Response) => void;

/** HTTP/2 connection preface ("PRI * HTTP/2.0…"); HTTP/1.x requests never start with "PRI". */
const H2_PREFACE_START = Buffer.from("PRI ");

/**
 * The HTTP servers behind one listener. Plain listeners (TCP h2c and the Unix socket) look at the first
 * bytes of each connection: the HTTP/2 preface goes to the HTTP/2 server (gRPC, gRPC-Web, Connect), the rest
 * to the HTTP/1.1 server (Connect and gRPC-Web from curl and browsers). TLS listeners choose by ALPN.
 */
export class HttpFront {
  readonly h2: http2.Http2Server | http2.Http2SecureServer;
  readonly h1: http.Server | undefined;
  readonly sessions = new Set<http2.Http2Session>();
  readonly sockets = new Set<net.Socket>();

  constructor(handler: Handler, tls?: TlsServerConfig) {
    if (tls) {
      this.h2 = http2.createSecureServer(
        {
          cert: tls.cert,
          key: tls.key,
          ...(tls.clientCa === undefined ? {} : { ca: tls.clientCa }),
          requestCert: tls.clientCa !== undefined || tls.requireClientCert === true,
          // Unverified clients complete the handshake but get no RPC served: they are answered
          // UNAUTHENTICATED with the reason, which every client can show (a TLS alert cannot be).
          rejectUnauthorized: false,
          allowHTTP1: true,
          minVersion: "TLSv1.2",
        },
        tls.requireClientCert ? requireClientCert(handler) : handler,
      );
      this.h1 = undefined;
    } else {
      this.h2 = http2.createServer({}, handler);
      this.h1 = http.createServer(handler);
      this.h1.keepAliveTimeout = 30_000;
    }
    this.h2.on("session", (s: http2.Http2Session) => {
      this.sessions.add(s);
      s.once("close", () => this.sessions.delete(s));
    });
  }

  /** Hands an accepted plain connection to the right server once its first bytes are known. */
  route(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.once("close", () => this.sockets.delete(socket));
    let head = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      if (head.length < H2_PREFACE_START.length && H2_PREFACE_START.subarray(0, head.length).equals(head))
        return;
      socket.off("data", onData);
      socket.pause();
      socket.unshift(head);
      const isH2 = head.subarray(0, H2_PREFACE_START.length).equals(H2_PREFACE_START);
      if (isH2) {
        // The HTTP/2 session reads what is buffered itself (and must get it before the socket flows).
        this.h2.emit("connection", socket);
      } else {
        (this.h1 as http.Server).emit("connection", socket);
        socket.resume();
      }
    };
    socket.on("data", onData);
    socket.on("error", () => socket.destroy());
  }
}

/** Wraps `handler` so that requests over a TLS connection whose client certificate did not verify are refused. */
function requireClientCert(handler: Handler): Handler {
  return (req, res) => {
    const socket = req.socket as tls.TLSSocket;
    if (socket.authorized) return handler(req, res);
    const presented = Object.keys(socket.getPeerCertificate() ?? {}).length > 0;
    const why = presented
      ? `client certificate not accepted: ${String(socket.authorizationError ?? "not signed by a trusted CA")}`
      : "client certificate required: this server accepts only mutual TLS";
    reject(req, res, Code.Unauthenticated, why);
  };
}

/**
 * Ends a request with an error in the caller's protocol: gRPC and gRPC-Web get a trailers-only
 * response with grpc-status, Connect and plain HTTP get a JSON error with the matching HTTP status.
 */
export function reject(req: Request, res: Response, code: Code, message: string): void {
  // Read (and drop) the request body, so that answering early does not reset the stream.
  req.resume();
  const contentType = String(req.headers["content-type"] ?? "");
  if (/^application\/grpc(-web)?(\+|;|$)/.test(contentType)) {
    const headers = {
      "content-type": contentType,
      "grpc-status": String(code),
      "grpc-message": encodeURIComponent(message),
    };
    if ("stream" in res) {
      // HTTP/2: a trailers-only response is one HEADERS frame that ends the stream.
      res.stream.respond({ ":status": 200, ...headers }, { endStream: true });
    } else {
      res.writeHead(200, headers);
      res.end();
    }
    return;
  }
  const http: Partial<Record<Code, number>> = { [Code.Unimplemented]: 404, [Code.Unauthenticated]: 401 };
  const name = Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
  res.writeHead(http[code] ?? 400, { "content-type": "application/json" });
  res.end(JSON.stringify({ code: name, message }));
}

/** Listens on TCP. Port 0 picks a free port; the bound address is returned. */
export async function listenTcp(
  front: HttpFront,
  host: string,
  port: number,
): Promise<{ server: net.Server; address: string }> {
  const server: net.Server = front.h1
    ? net.createServer({ noDelay: true }, (s) => front.route(s))
    : (front.h2 as http2.Http2SecureServer);
  if (!front.h1) {
    server.on("connection", (s: net.Socket) => {
      s.setNoDelay(true);
      front.sockets.add(s);
      s.once("close", () => front.sockets.delete(s));
    });
  }
  await listen(server, { host, port }, `${host}:${port}`);
  const a = server.address() as net.AddressInfo;
  return { server, address: a.family === "IPv6" ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}` };
}

/**
 * Listens on a Unix socket with `mode` (default 0660). A socket file left by a process that died is
 * removed; a socket some live process still answers on is refused with FAILED_PRECONDITION, so a second
 * agent never steals the first one's socket.
 */
export async function listenUnix(front: HttpFront, path: string, mode = 0o660): Promise<net.Server> {
  await mkdir(dirname(path), { recursive: true, mode: 0o755 });
  const stat = await lstat(path).catch(() => undefined);
  if (stat) {
    if (!stat.isSocket()) {
      throw new VmenvError(
        "failed-precondition",
        `${path} exists and is not a socket; refusing to replace it`,
        {
          reason: "SOCKET_PATH_NOT_A_SOCKET",
          metadata: { path },
        },
      );
    }
    if (await answers(path)) {
      throw new VmenvError("failed-precondition", `socket ${path} is in use by another running process`, {
        reason: "SOCKET_IN_USE",
        metadata: { path },
      });
    }
    await unlink(path).catch(() => undefined);
  }
  const server = net.createServer((s) => front.route(s));
  // Create the socket with restrictive permissions from the start, then set the requested mode.
  const oldMask = process.umask(0o177);
  try {
    await listen(server, { path }, path);
  } finally {
    process.umask(oldMask);
  }
  await chmod(path, mode);
  return server;
}

function answers(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ path });
    const done = (alive: boolean) => {
      s.destroy();
      resolve(alive);
    };
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
    s.setTimeout(1000, () => done(false));
  });
}

function listen(server: net.Server, opts: net.ListenOptions, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) => {
      server.off("listening", onListening);
      const reason = err.code === "EADDRINUSE" ? "ADDRESS_IN_USE" : "LISTEN_FAILED";
      reject(
        new VmenvError("failed-precondition", `cannot listen on ${what}: ${err.message}`, {
          reason,
          metadata: { address: what },
          cause: err,
        }),
      );
    };
    const onListening = () => {
      server.off("error", onError);
      resolve();
    };
    server.once("error", onError);
    server.once("listening", onListening);
    server.listen(opts);
  });
}
