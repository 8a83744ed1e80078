import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import type { Logger } from "pino";
import { requestIdOf } from "./request-id.js";

/**
 * One structured log line per call, when it ends: method, protocol, code, duration and request id.
 * Streams are logged when the stream ends, with the number of messages sent.
 */
export function loggingInterceptor(logger: Logger): Interceptor {
  return (next) => async (req) => {
    const start = performance.now();
    const base = {
      method: `${req.service.typeName}/${req.method.name}`,
      requestId: requestIdOf(req.contextValues),
    };
    const done = (err: unknown, messages?: number) => {
      const code = err === undefined ? "ok" : Code[ConnectError.from(err).code];
      const durationMs = Math.round((performance.now() - start) * 1000) / 1000;
      const line = { ...base, code, durationMs, ...(messages === undefined ? {} : { messages }) };
      if (err === undefined) logger.info(line, "rpc");
      else logger.warn({ ...line, error: ConnectError.from(err).rawMessage }, "rpc");
    };
    let res: Awaited<ReturnType<typeof next>>;
    try {
      res = await next(req);
    } catch (err) {
      done(err);
      throw err;
    }
    if (!res.stream) {
      done(undefined);
      return res;
    }
    const message = res.message;
    return {
      ...res,
      message: (async function* () {
        let n = 0;
        try {
          for await (const m of message) {
            n++;
            yield m;
          }
        } catch (err) {
          done(err, n);
          throw err;
        }
        done(undefined, n);
      })(),
    };
  };
}

/**
 * Deadlines: a unary call whose client set no deadline gets `defaultUnaryTimeoutMs`, so no request
 * runs forever. Handlers see one abort signal that fires on client cancel, deadline or shutdown.
 */
export function deadlineInterceptor(defaultUnaryTimeoutMs: number): Interceptor {
  return (next) => async (req) => {
    if (req.stream || req.header.has("grpc-timeout") || req.header.has("connect-timeout-ms"))
      return next(req);
    const timeout = AbortSignal.timeout(defaultUnaryTimeoutMs);
    const signal = AbortSignal.any([req.signal, timeout]);
    try {
      return await next({ ...req, signal });
    } catch (err) {
      if (timeout.aborted) {
        throw new ConnectError(
          `no answer within the server's limit of ${defaultUnaryTimeoutMs} ms`,
          Code.DeadlineExceeded,
        );
      }
      throw err;
    }
  };
}
