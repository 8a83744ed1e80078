/**
 * cloud-hypervisor adapter: the `VmmDriver`, a typed client of the VMM's REST API socket and the builders
 * of its request bodies. The test helpers under `testing/` are not part of this surface.
 */
export {
  type CallOptions,
  CH_API_PREFIX,
  CH_ENDPOINTS,
  type ChEndpoint,
  type ChEndpointName,
  CloudHypervisorClient,
  type CloudHypervisorClientOptions,
  DEFAULT_CALL_TIMEOUT_MS,
} from "./api.js";
export {
  type ByteSize,
  buildDiskConfig,
  buildNetConfig,
  buildResize,
  buildVfioDeviceConfig,
  buildVmConfig,
  ChConfigError,
  type ChDiskSpec,
  type ChFirmwareBoot,
  type ChGpuSpec,
  type ChKernelBoot,
  type ChLaunchSpec,
  type ChNicSpec,
  type ChNumaNodeSpec,
  type ChSerialSpec,
} from "./config.js";
export { CloudHypervisorDriver, type CloudHypervisorDriverOptions } from "./driver.js";
export {
  CloudHypervisorApiError,
  CloudHypervisorError,
  CloudHypervisorProtocolError,
  CloudHypervisorTimeoutError,
  CloudHypervisorUnreachableError,
} from "./errors.js";
export type {
  ConsoleConfig,
  ConsoleMode,
  CpuAffinity,
  CpusConfig,
  DeviceConfig,
  DiskConfig,
  ImageType,
  MemoryConfig,
  MemoryZoneConfig,
  NetConfig,
  NumaConfig,
  PayloadConfig,
  PciDeviceInfo,
  ReceiveMigrationData,
  RestoreConfig,
  SendMigrationData,
  SerialConfig,
  VmConfig,
  VmCounters,
  VmInfo,
  VmmPingResponse,
  VmRemoveDevice,
  VmResize,
  VmSnapshotConfig,
  VmState,
} from "./types.js";
