import { Code, ConnectError } from "@connectrpc/connect";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { type ErrorCode, VmenvError } from "@vmenv/rpc/errors";
import type { OpError } from "./types.js";

/** connect's codes → the @vmenv/rpc spelling (codes vmenv never raises itself become "internal"). */
const fromConnect: Partial<Record<Code, ErrorCode>> = {
  [Code.Canceled]: "cancelled",
  [Code.InvalidArgument]: "invalid-argument",
  [Code.DeadlineExceeded]: "deadline-exceeded",
  [Code.NotFound]: "not-found",
  [Code.AlreadyExists]: "already-exists",
  [Code.PermissionDenied]: "permission-denied",
  [Code.ResourceExhausted]: "resource-exhausted",
  [Code.FailedPrecondition]: "failed-precondition",
  [Code.Aborted]: "aborted",
  [Code.OutOfRange]: "out-of-range",
  [Code.Unimplemented]: "unimplemented",
  [Code.Internal]: "internal",
  [Code.Unavailable]: "unavailable",
  [Code.Unauthenticated]: "unauthenticated",
};

/** Whether an error is worth retrying as is: the other side was unreachable or too slow. */
export function isTransient(err: unknown): boolean {
  if (err instanceof VmenvError) return err.code === "unavailable" || err.code === "deadline-exceeded";
  if (err instanceof ConnectError) return err.code === Code.Unavailable || err.code === Code.DeadlineExceeded;
  return false;
}

/**
 * A thrown error as an operation records it. VmenvErrors and agent errors (ConnectError with ErrorInfo)
 * keep their code, reason and metadata; anything else is INTERNAL with a pointer to the log (`known`
 * false: the caller logs the cause).
 */
export function toOpError(err: unknown): { error: OpError; known: boolean } {
  if (err instanceof VmenvError)
    return {
      error: { code: err.code, message: err.message, reason: err.reason, metadata: { ...err.metadata } },
      known: true,
    };
  if (err instanceof ConnectError) {
    const info = err.findDetails(ErrorInfoSchema)[0];
    return {
      error: {
        code: fromConnect[err.code] ?? "internal",
        message: err.rawMessage,
        reason:
          info?.reason || (Code[err.code] ?? "UNKNOWN").replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase(),
        metadata: { ...(info?.metadata ?? {}) },
      },
      known: true,
    };
  }
  return {
    error: {
      code: "internal",
      message: "internal error; the coordinator log has the details",
      reason: "INTERNAL",
      metadata: {},
    },
    known: false,
  };
}

/** A recorded error as a VmenvError again (for the RPC edge). */
export function fromOpError(e: OpError): VmenvError {
  return new VmenvError(e.code as ErrorCode, e.message, { reason: e.reason, metadata: e.metadata });
}
