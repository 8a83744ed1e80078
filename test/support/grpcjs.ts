import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { repoRoot } from "./agent.js";

/** An independent gRPC implementation: @grpc/grpc-js with the .proto files parsed at run time. */
export function grpcJsHostClient(target: string, credentials = grpc.credentials.createInsecure()) {
  const def = protoLoader.loadSync("vmenv/agent/v1/host.proto", {
    includeDirs: [join(repoRoot, "proto"), join(repoRoot, "build/proto-deps")],
    longs: String,
    enums: String,
    defaults: true,
  });
  const pkg = grpc.loadPackageDefinition(def) as unknown as {
    vmenv: { agent: { v1: { HostService: grpc.ServiceClientConstructor } } };
  };
  const client = new pkg.vmenv.agent.v1.HostService(target, credentials);
  const getHostInfo = () =>
    new Promise<Record<string, unknown>>((resolve, reject) =>
      client.GetHostInfo({}, (err: grpc.ServiceError | null, res: Record<string, unknown>) =>
        err ? reject(err) : resolve(res),
      ),
    );
  return { client, getHostInfo };
}
