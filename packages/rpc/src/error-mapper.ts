import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema } from "@vmenv/api/google/rpc";
import type { Logger } from "pino";
import { type ErrorCode, VmenvError } from "./errors.js";
import { requestIdOf } from "./request-id.js";

/** `google.rpc.ErrorInfo.domain` of every error vmenv raises. */
export const ERROR_DOMAIN = "vmenv.dev";

const codes: Record<ErrorCode, Code> = {
  "invalid-argument": Code.InvalidArgument,
  "not-found": Code.NotFound,
  "already-exists": Code.AlreadyExists,
  "failed-precondition": Code.FailedPrecondition,
  "resource-exhausted": Code.ResourceExhausted,
  "permission-denied": Code.PermissionDenied,
  unauthenticated: Code.Unauthenticated,
  aborted: Code.Aborted,
  "out-of-range": Code.OutOfRange,
  unimplemented: Code.Unimplemented,
  unavailable: Code.Unavailable,
  "deadline-exceeded": Code.DeadlineExceeded,
  cancelled: Code.Canceled,
  internal: Code.Internal,
};

/** Converts a domain error to the ConnectError sent on the wire (code, message, ErrorInfo, BadRequest). */
export function toConnectError(err: VmenvError): ConnectError {
  const details: NonNullable<ConstructorParameters<typeof ConnectError>[3]> = [
    {
      desc: ErrorInfoSchema,
      value: { reason: err.reason, domain: ERROR_DOMAIN, metadata: { ...err.metadata } },
    },
  ];
  if (err.fieldViolations.length > 0) {
    details.push({
      desc: BadRequestSchema,
      value: create(BadRequestSchema, {
        fieldViolations: err.fieldViolations.map((v) => ({ field: v.field, description: v.description })),
      }),
    });
  }
  return new ConnectError(err.message, codes[err.code], undefined, details, err);
}

/**
 * The one error mapper: typed domain errors become their canonical code with ErrorInfo; ConnectErrors
 * pass through; anything else becomes INTERNAL with a request id to quote, and its cause is logged, not
 * sent.
 */
export function errorMapperInterceptor(logger: Logger): Interceptor {
  const map = (err: unknown, method: string, requestId: string | undefined, signal: AbortSignal): unknown => {
    if (err instanceof VmenvError) return toConnectError(err);
    if (err instanceof ConnectError) return err;
    // A handler that stopped because its call was aborted (deadline, client cancel, shutdown) reports
    // why the call was aborted, not the AbortError its I/O threw.
    if (signal.aborted) return ConnectError.from(signal.reason, Code.Canceled);
    logger.error({ err, method, requestId }, "unexpected error in handler");
    return new ConnectError(
      `internal error${requestId ? ` (request id ${requestId})` : ""}; the agent log has the details`,
      Code.Internal,
      undefined,
      [{ desc: ErrorInfoSchema, value: { reason: "INTERNAL", domain: ERROR_DOMAIN, metadata: {} } }],
    );
  };
  return (next) => async (req) => {
    const method = `${req.service.typeName}/${req.method.name}`;
    try {
      const res = await next(req);
      if (!res.stream) return res;
      const message = res.message;
      return {
        ...res,
        message: (async function* () {
          try {
            yield* message;
          } catch (err) {
            throw map(err, method, requestIdOf(req.contextValues), req.signal);
          }
        })(),
      };
    } catch (err) {
      throw map(err, method, requestIdOf(req.contextValues), req.signal);
    }
  };
}
