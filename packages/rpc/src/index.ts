export {
  type ClientConfig,
  createDaemonClient,
  createDaemonTransport,
  DEFAULT_RETRY,
  isRetrySafe,
  type RetryPolicy,
  retryInterceptor,
  sleep,
  type TlsClientConfig,
} from "./client.js";
export { EchoService, echoService } from "./echo.js";
export { ERROR_DOMAIN, errorMapperInterceptor, toConnectError } from "./error-mapper.js";
export {
  alreadyExists,
  type ErrorCode,
  type FieldViolation,
  failedPrecondition,
  invalidArgument,
  notFound,
  unimplemented,
  VmenvError,
  type VmenvErrorInit,
} from "./errors.js";
export { HealthRegistry, healthService, ServingStatus } from "./health.js";
export { deadlineInterceptor, loggingInterceptor } from "./interceptors.js";
export type { TlsServerConfig } from "./listen.js";
export { createLogger, LOG_LEVELS, type Logger, type LogLevel } from "./logger.js";
export { noFilter, page } from "./paging.js";
export { DescriptorIndex, reflectionServices } from "./reflection.js";
export { REQUEST_ID_HEADER, requestIdInterceptor, requestIdOf } from "./request-id.js";
export {
  bind,
  type RpcServer,
  type ServeOptions,
  type ServiceBinding,
  serve,
  unimplementedService,
} from "./server.js";
export { boundedWatch, type WatchStart } from "./watch.js";
