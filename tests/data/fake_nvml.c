/* A fake libnvidia-ml.so.1 for tests: the NVML calls pynvml makes, with values read
 * from the file named by FAKE_NVML_STATE on every call, so a test can change them.
 *
 * State file:  line 1: "<count>" or "driver_not_loaded"
 *              then one line per GPU: "<util%> <mem_used> <mem_total> <lost 0|1> <name> <uuid>"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999
#define MAX_GPUS 16

typedef struct { unsigned int gpu; unsigned int memory; } nvmlUtilization_t;
typedef struct { unsigned long long total; unsigned long long free; unsigned long long used; } nvmlMemory_t;
typedef struct { unsigned int util; unsigned long long used, total; int lost; char name[64]; char uuid[96]; } gpu_t;

static int load(gpu_t *gpus, int *count) {
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    char first[64];
    if (!f) return NVML_ERROR_UNKNOWN;
    if (fscanf(f, "%63s", first) != 1) { fclose(f); return NVML_ERROR_UNKNOWN; }
    if (strcmp(first, "driver_not_loaded") == 0) { fclose(f); return NVML_ERROR_DRIVER_NOT_LOADED; }
    *count = atoi(first);
    if (*count > MAX_GPUS) *count = MAX_GPUS;
    for (int i = 0; i < *count; i++) {
        if (fscanf(f, "%u %llu %llu %d %63s %95s", &gpus[i].util, &gpus[i].used, &gpus[i].total,
                   &gpus[i].lost, gpus[i].name, gpus[i].uuid) != 6) { fclose(f); return NVML_ERROR_UNKNOWN; }
    }
    fclose(f);
    return NVML_SUCCESS;
}

static int device(void *handle, gpu_t *out) {
    gpu_t gpus[MAX_GPUS]; int count = 0;
    int rc = load(gpus, &count);
    long index = (long)handle - 1;
    if (rc != NVML_SUCCESS) return rc;
    if (index < 0 || index >= count) return NVML_ERROR_INVALID_ARGUMENT;
    if (gpus[index].lost) return NVML_ERROR_GPU_IS_LOST;
    *out = gpus[index];
    return NVML_SUCCESS;
}

int nvmlInitWithFlags(unsigned int flags) { gpu_t g[MAX_GPUS]; int c; (void)flags; return load(g, &c); }
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
    gpu_t g; int rc = device(handle, &g);
    if (rc == NVML_SUCCESS) { strncpy(name, g.name, length); name[length - 1] = 0; }
    return rc;
}

int nvmlDeviceGetUUID(void *handle, char *uuid, unsigned int length) {
    gpu_t g; int rc = device(handle, &g);
    if (rc == NVML_SUCCESS) { strncpy(uuid, g.uuid, length); uuid[length - 1] = 0; }
    return rc;
}

int nvmlDeviceGetUtilizationRates(void *handle, nvmlUtilization_t *u) {
    gpu_t g; int rc = device(handle, &g);
    if (rc == NVML_SUCCESS) { u->gpu = g.util; u->memory = g.util; }
    return rc;
}

int nvmlDeviceGetMemoryInfo(void *handle, nvmlMemory_t *m) {
    gpu_t g; int rc = device(handle, &g);
    if (rc == NVML_SUCCESS) { m->total = g.total; m->used = g.used; m->free = g.total - g.used; }
    return rc;
}

const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    default: return "Unknown Error";
    }
}
