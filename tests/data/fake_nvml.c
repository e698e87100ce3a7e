/* A fake libnvidia-ml.so.1 for tests: the NVML calls pynvml makes, with values read
 * from the file named by FAKE_NVML_STATE on every call, so a test can change them.
 *
 * State file:  line 1: "<count>" or "driver_not_loaded"
 *              then one line per GPU:
 *                "<util%|na> <mem_used> <mem_total> <lost 0|1> <name> <uuid> [options]"
 *              util "na": nvmlDeviceGetUtilizationRates answers NVML_ERROR_NOT_SUPPORTED.
 *              options (space separated):
 *                mig=<n>   MIG mode on, n MIG devices (slots 0..n-1 of 7), each a 1/n slice
 *                          of the memory, uuid "MIG-<uuid>-<slot>"; utilization of the GPU
 *                          and of its MIG devices is NOT_SUPPORTED, as on real MIG GPUs.
 *                procs=<pid>:<bytes>[,<pid>:<bytes>...]  running compute processes (on a
 *                          MIG GPU they run on MIG device 0); bytes "na" = not available.
 * Built with -DOLD_DRIVER, the MIG and running-process functions are missing (an old driver).
 * Every call is counted per function in the file named by FAKE_NVML_CALLS (when set): one
 * line "<function>" appended per call, so a test can see an error loop.
 * FAKE_NVML_INIT_DELAY_MS makes nvmlInit take that long, as a driver starting up does.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999
#define MAX_GPUS 16
#define MAX_PROCS 64
#define MAX_MIG_SLOTS 7
#define NA_ULL 0xFFFFFFFFFFFFFFFFULL

typedef struct { unsigned int gpu; unsigned int memory; } nvmlUtilization_t;
typedef struct { unsigned long long total; unsigned long long free; unsigned long long used; } nvmlMemory_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId;
                 unsigned int computeInstanceId; } nvmlProcessInfo_t;
typedef struct {
    int util; /* -1: not supported */
    unsigned long long used, total; int lost; char name[64]; char uuid[96];
    int mig; int nprocs; unsigned int pids[MAX_PROCS]; unsigned long long mem[MAX_PROCS];
} gpu_t;

static void count_call(const char *name) {
    const char *path = getenv("FAKE_NVML_CALLS");
    FILE *f = path ? fopen(path, "a") : NULL;
    if (f) { fprintf(f, "%s\n", name); fclose(f); }
}

static void parse_options(char *rest, gpu_t *g) {
    for (char *tok = strtok(rest, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
        if (strncmp(tok, "mig=", 4) == 0) g->mig = atoi(tok + 4);
        else if (strncmp(tok, "procs=", 6) == 0) {
            char *item = tok + 6;
            while (*item && g->nprocs < MAX_PROCS) {
                char *comma = strchr(item, ',');
                if (comma) *comma = 0;
                char *colon = strchr(item, ':');
                if (colon) {
                    *colon = 0;
                    g->pids[g->nprocs] = (unsigned int)strtoul(item, NULL, 10);
                    g->mem[g->nprocs] = strcmp(colon + 1, "na") == 0 ? NA_ULL
                                        : strtoull(colon + 1, NULL, 10);
                    g->nprocs++;
                }
                if (!comma) break;
                item = comma + 1;
            }
        }
    }
}

static int load(gpu_t *gpus, int *count) {
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    char line[4096];
    if (!f) return NVML_ERROR_UNKNOWN;
    if (!fgets(line, sizeof line, f)) { fclose(f); return NVML_ERROR_UNKNOWN; }
    if (strncmp(line, "driver_not_loaded", 17) == 0) { fclose(f); return NVML_ERROR_DRIVER_NOT_LOADED; }
    *count = atoi(line);
    if (*count > MAX_GPUS) *count = MAX_GPUS;
    for (int i = 0; i < *count; i++) {
        char util[16]; int used_chars = 0;
        gpu_t *g = &gpus[i];
        memset(g, 0, sizeof *g);
        if (!fgets(line, sizeof line, f)
            || sscanf(line, "%15s %llu %llu %d %63s %95s%n", util, &g->used, &g->total, &g->lost,
                      g->name, g->uuid, &used_chars) != 6) { fclose(f); return NVML_ERROR_UNKNOWN; }
        g->util = strcmp(util, "na") == 0 ? -1 : atoi(util);
        parse_options(line + used_chars, g);
    }
    fclose(f);
    return NVML_SUCCESS;
}

/* Handles: GPU i is (i + 1); MIG device s of GPU i is (i + 1) | ((s + 1) << 8). */
static int device(void *handle, gpu_t *out, int *slot) {
    gpu_t gpus[MAX_GPUS]; int count = 0;
    int rc = load(gpus, &count);
    long h = (long)handle, index = (h & 0xff) - 1;
    *slot = (int)(h >> 8) - 1;
    if (rc != NVML_SUCCESS) return rc;
    if (index < 0 || index >= count) return NVML_ERROR_INVALID_ARGUMENT;
    if (gpus[index].lost) return NVML_ERROR_GPU_IS_LOST;
    if (*slot >= gpus[index].mig) return NVML_ERROR_INVALID_ARGUMENT;
    *out = gpus[index];
    return NVML_SUCCESS;
}

int nvmlInitWithFlags(unsigned int flags) {
    gpu_t g[MAX_GPUS]; int c; (void)flags;
    const char *delay = getenv("FAKE_NVML_INIT_DELAY_MS");  /* a slow driver start-up */
    if (delay) usleep((useconds_t)atoi(delay) * 1000);
    return load(g, &c);
}
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlShutdown(void) { return NVML_SUCCESS; }

int nvmlDeviceGetCount_v2(unsigned int *count) {
    gpu_t g[MAX_GPUS]; int c = 0; int rc = load(g, &c);
    if (rc == NVML_SUCCESS) *count = (unsigned int)c;
    return rc;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    gpu_t g[MAX_GPUS]; int c = 0; int rc = load(g, &c);
    if (rc != NVML_SUCCESS) return rc;
    if ((int)index >= c) return NVML_ERROR_INVALID_ARGUMENT;
    *handle = (void *)(long)(index + 1);
    return NVML_SUCCESS;
}

int nvmlDeviceGetName(void *handle, char *name, unsigned int length) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    if (rc == NVML_SUCCESS) {
        if (slot >= 0) snprintf(name, length, "%s-MIG-1g", g.name);
        else { strncpy(name, g.name, length); name[length - 1] = 0; }
    }
    return rc;
}

int nvmlDeviceGetUUID(void *handle, char *uuid, unsigned int length) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    if (rc == NVML_SUCCESS) {
        if (slot >= 0) snprintf(uuid, length, "MIG-%s-%d", g.uuid, slot);
        else { strncpy(uuid, g.uuid, length); uuid[length - 1] = 0; }
    }
    return rc;
}

int nvmlDeviceGetUtilizationRates(void *handle, nvmlUtilization_t *u) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    count_call("nvmlDeviceGetUtilizationRates");
    if (rc != NVML_SUCCESS) return rc;
    if (g.util < 0 || g.mig > 0) return NVML_ERROR_NOT_SUPPORTED;
    u->gpu = (unsigned int)g.util; u->memory = (unsigned int)g.util;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo(void *handle, nvmlMemory_t *m) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    if (rc != NVML_SUCCESS) return rc;
    if (slot >= 0) { g.total /= (unsigned long long)g.mig; g.used /= (unsigned long long)g.mig; }
    m->total = g.total; m->used = g.used; m->free = g.total - g.used;
    return NVML_SUCCESS;
}

#ifndef OLD_DRIVER  /* built with -DOLD_DRIVER: no MIG or process calls, as old drivers */
int nvmlDeviceGetMigMode(void *handle, unsigned int *current, unsigned int *pending) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    if (rc != NVML_SUCCESS) return rc;
    if (slot >= 0) return NVML_ERROR_INVALID_ARGUMENT;
    if (g.mig <= 0 && strstr(g.name, "A100") == NULL && strstr(g.name, "H100") == NULL)
        return NVML_ERROR_NOT_SUPPORTED;  /* a GPU without MIG support */
    *current = *pending = g.mig > 0 ? 1 : 0;
    return NVML_SUCCESS;
}

int nvmlDeviceGetMaxMigDeviceCount(void *handle, unsigned int *count) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    if (rc == NVML_SUCCESS) *count = g.mig > 0 ? MAX_MIG_SLOTS : 0;
    return rc;
}

int nvmlDeviceGetMigDeviceHandleByIndex(void *handle, unsigned int index, void **mig) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    if (rc != NVML_SUCCESS) return rc;
    if (slot >= 0) return NVML_ERROR_INVALID_ARGUMENT;
    if ((int)index >= g.mig) return NVML_ERROR_NOT_FOUND;
    *mig = (void *)((long)handle | ((long)(index + 1) << 8));
    return NVML_SUCCESS;
}

int nvmlDeviceGetComputeRunningProcesses_v3(void *handle, unsigned int *count, nvmlProcessInfo_t *infos) {
    gpu_t g; int slot; int rc = device(handle, &g, &slot);
    if (rc != NVML_SUCCESS) return rc;
    int n = (g.mig > 0 && slot != 0) ? 0 : g.nprocs;  /* on a MIG GPU: all on MIG device 0 */
    if (infos == NULL || *count < (unsigned int)n) {
        *count = (unsigned int)n;
        return n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) {
        infos[i].pid = g.pids[i]; infos[i].usedGpuMemory = g.mem[i];
        infos[i].gpuInstanceId = infos[i].computeInstanceId = slot >= 0 ? 0 : 0xFFFFFFFF;
    }
    *count = (unsigned int)n;
    return NVML_SUCCESS;
}

#endif

const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    default: return "Unknown Error";
    }
}
