/*
 * Test double of Microsoft's vmsavedstatedumpprovider.dll, built by the test suite on Linux.
 *
 * Exports the functions vm2core's ctypes binding uses, with the signatures of the Windows SDK's
 * VmSavedStateDump.h / VmSavedStateDumpDefs.h (HRESULT = 32-bit LONG, LPCWSTR = 16-bit UTF-16 code
 * units, VIRTUAL_PROCESSOR_REGISTER = 16-byte union, GPA_MEMORY_CHUNK = two UINT64).  WINAPI is
 * __stdcall on Windows; on x86-64 that is the platform's one calling convention, as here.
 *
 * It serves a fixture written by tests/dll_provider/__init__.py:
 *   LoadSavedStateFile(vmrs)        -> description "<vmrs>.fixture", memory "<vmrs>.mem"
 *   LoadSavedStateFiles(bin, vsv)   -> description "<vsv>.fixture",  memory "<bin>" (chunks back to back)
 * Description: "VMDPFIX1", u32 vp_count, u32 architecture, u64 page_size, u64 chunk_count,
 * chunk_count x {u64 first_page, u64 page_count}, vp_count x 66 x 16-byte register values.
 *
 * Test hooks (environment): FAKE_PROVIDER_FAIL="Function:0xHRESULT" makes that function fail;
 * FAKE_PROVIDER_LOG=path appends one line per call ("Read <gpa> <size>", "Release", ...).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int32_t HRESULT;
typedef uint16_t WCHAR;                      /* Windows' wchar_t: UTF-16 code unit */
typedef void *VM_SAVED_STATE_DUMP_HANDLE;

#define EXPORT __attribute__((visibility("default")))
#define S_OK ((HRESULT)0)
#define E_FAIL ((HRESULT)0x80004005)
#define E_INVALIDARG ((HRESULT)0x80070057)
#define E_FILE_NOT_FOUND ((HRESULT)0x80070002)
#define E_INSUFFICIENT_BUFFER ((HRESULT)0x8007007A)
#define REGISTER_COUNT 66                   /* X64_RegisterRax (0) .. X64_RegisterGdtr (65) */

typedef struct { uint64_t first_page, page_count; } GPA_MEMORY_CHUNK;
typedef struct { uint64_t low, high; } VIRTUAL_PROCESSOR_REGISTER;

typedef struct {
    uint32_t vp_count, arch;
    uint64_t page_size, chunk_count;
    GPA_MEMORY_CHUNK *chunks;
    uint64_t *chunk_offset;                  /* where each chunk starts in the memory file */
    VIRTUAL_PROCESSOR_REGISTER *regs;
    FILE *memory;
} Dump;

static void log_call(const char *fmt, unsigned long long a, unsigned long long b) {
    const char *path = getenv("FAKE_PROVIDER_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, fmt, a, b);
    fputc('\n', f);
    fclose(f);
}

static int fails(const char *name, HRESULT *hr) {
    const char *spec = getenv("FAKE_PROVIDER_FAIL");
    size_t n = strlen(name);
    if (!spec || strncmp(spec, name, n) != 0 || spec[n] != ':') return 0;
    *hr = (HRESULT)strtoul(spec + n + 1, NULL, 16);
    return 1;
}

/* UTF-16 (with surrogate pairs) -> UTF-8, so a non-ASCII path proves the binding sent UTF-16. */
static char *utf8(const WCHAR *w, const char *suffix) {
    size_t n = 0;
    while (w[n]) n++;
    char *out = malloc(n * 4 + strlen(suffix) + 1), *p = out;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = w[i];
        if (c >= 0xD800 && c < 0xDC00 && i + 1 < n && w[i + 1] >= 0xDC00 && w[i + 1] < 0xE000)
            c = 0x10000 + ((c - 0xD800) << 10) + (w[++i] - 0xDC00);
        if (c < 0x80) *p++ = (char)c;
        else if (c < 0x800) { *p++ = (char)(0xC0 | c >> 6); *p++ = (char)(0x80 | (c & 0x3F)); }
        else if (c < 0x10000) {
            *p++ = (char)(0xE0 | c >> 12); *p++ = (char)(0x80 | ((c >> 6) & 0x3F)); *p++ = (char)(0x80 | (c & 0x3F));
        } else {
            *p++ = (char)(0xF0 | c >> 18); *p++ = (char)(0x80 | ((c >> 12) & 0x3F));
            *p++ = (char)(0x80 | ((c >> 6) & 0x3F)); *p++ = (char)(0x80 | (c & 0x3F));
        }
    }
    strcpy(p, suffix);
    return out;
}

static HRESULT load(const char *description, const char *memory, VM_SAVED_STATE_DUMP_HANDLE *out) {
    FILE *f = fopen(description, "rb");
    if (!f) return E_FILE_NOT_FOUND;
    char magic[8];
    Dump *d = calloc(1, sizeof *d);
    HRESULT hr = E_FAIL;
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "VMDPFIX1", 8) != 0) goto done;
    if (fread(&d->vp_count, 4, 1, f) != 1 || fread(&d->arch, 4, 1, f) != 1) goto done;
    if (fread(&d->page_size, 8, 1, f) != 1 || fread(&d->chunk_count, 8, 1, f) != 1) goto done;
    if (d->vp_count > 4096 || d->chunk_count > 4096 || d->page_size == 0) goto done;
    d->chunks = calloc(d->chunk_count ? d->chunk_count : 1, sizeof *d->chunks);
    d->chunk_offset = calloc(d->chunk_count ? d->chunk_count : 1, sizeof *d->chunk_offset);
    d->regs = calloc((size_t)d->vp_count * REGISTER_COUNT + 1, sizeof *d->regs);
    if (fread(d->chunks, sizeof *d->chunks, d->chunk_count, f) != d->chunk_count) goto done;
    if (fread(d->regs, sizeof *d->regs, (size_t)d->vp_count * REGISTER_COUNT, f)
        != (size_t)d->vp_count * REGISTER_COUNT) goto done;
    uint64_t offset = 0;
    for (uint64_t i = 0; i < d->chunk_count; i++) {
        d->chunk_offset[i] = offset;
        offset += d->chunks[i].page_count * d->page_size;
    }
    d->memory = fopen(memory, "rb");
    if (!d->memory) { hr = E_FILE_NOT_FOUND; goto done; }
    *out = d;
    hr = S_OK;
done:
    fclose(f);
    if (hr != S_OK) { free(d->chunks); free(d->chunk_offset); free(d->regs); free(d); }
    return hr;
}

EXPORT HRESULT LoadSavedStateFile(const WCHAR *vmrsFile, VM_SAVED_STATE_DUMP_HANDLE *handle) {
    HRESULT hr;
    if (fails("LoadSavedStateFile", &hr)) return hr;
    char *description = utf8(vmrsFile, ".fixture"), *memory = utf8(vmrsFile, ".mem");
    hr = load(description, memory, handle);
    log_call("LoadSavedStateFile %llu%llu", 0, 0);
    free(description);
    free(memory);
    return hr;
}

EXPORT HRESULT LoadSavedStateFiles(const WCHAR *binFile, const WCHAR *vsvFile, VM_SAVED_STATE_DUMP_HANDLE *handle) {
    HRESULT hr;
    if (fails("LoadSavedStateFiles", &hr)) return hr;
    char *description = utf8(vsvFile, ".fixture"), *memory = utf8(binFile, "");
    hr = load(description, memory, handle);
    log_call("LoadSavedStateFiles %llu%llu", 0, 0);
    free(description);
    free(memory);
    return hr;
}

EXPORT HRESULT ReleaseSavedStateFiles(VM_SAVED_STATE_DUMP_HANDLE handle) {
    Dump *d = handle;
    HRESULT hr;
    log_call("Release %llu%llu", 0, 0);
    if (!d) return E_INVALIDARG;
    fclose(d->memory);
    free(d->chunks); free(d->chunk_offset); free(d->regs); free(d);
    if (fails("ReleaseSavedStateFiles", &hr)) return hr;
    return S_OK;
}

EXPORT HRESULT GetVpCount(VM_SAVED_STATE_DUMP_HANDLE handle, uint32_t *vpCount) {
    HRESULT hr;
    if (fails("GetVpCount", &hr)) return hr;
    *vpCount = ((Dump *)handle)->vp_count;
    return S_OK;
}

EXPORT HRESULT GetArchitecture(VM_SAVED_STATE_DUMP_HANDLE handle, uint32_t vpId, int32_t *architecture) {
    Dump *d = handle;
    HRESULT hr;
    if (fails("GetArchitecture", &hr)) return hr;
    if (vpId >= d->vp_count) return E_INVALIDARG;
    *architecture = (int32_t)d->arch;
    return S_OK;
}

EXPORT HRESULT GetRegisterValue(VM_SAVED_STATE_DUMP_HANDLE handle, uint32_t vpId, uint32_t registerId,
                                VIRTUAL_PROCESSOR_REGISTER *registerValue) {
    Dump *d = handle;
    HRESULT hr;
    if (fails("GetRegisterValue", &hr)) return hr;
    if (vpId >= d->vp_count || registerId >= REGISTER_COUNT) return E_INVALIDARG;
    *registerValue = d->regs[(size_t)vpId * REGISTER_COUNT + registerId];
    return S_OK;
}

EXPORT HRESULT GetGuestPhysicalMemoryChunks(VM_SAVED_STATE_DUMP_HANDLE handle, uint64_t *memoryChunkPageSize,
                                            GPA_MEMORY_CHUNK *memoryChunks, uint64_t *memoryChunkCount) {
    Dump *d = handle;
    HRESULT hr;
    if (fails("GetGuestPhysicalMemoryChunks", &hr)) return hr;
    *memoryChunkPageSize = d->page_size;
    if (*memoryChunkCount < d->chunk_count || !memoryChunks) {
        *memoryChunkCount = d->chunk_count;
        return E_INSUFFICIENT_BUFFER;
    }
    memcpy(memoryChunks, d->chunks, d->chunk_count * sizeof *d->chunks);
    *memoryChunkCount = d->chunk_count;
    return S_OK;
}

EXPORT HRESULT ReadGuestPhysicalAddress(VM_SAVED_STATE_DUMP_HANDLE handle, uint64_t physicalAddress, void *buffer,
                                        uint32_t bufferSize, uint32_t *bytesRead) {
    Dump *d = handle;
    HRESULT hr;
    log_call("Read %llu %llu", physicalAddress, bufferSize);
    if (fails("ReadGuestPhysicalAddress", &hr)) return hr;
    for (uint64_t i = 0; i < d->chunk_count; i++) {
        uint64_t start = d->chunks[i].first_page * d->page_size, size = d->chunks[i].page_count * d->page_size;
        if (physicalAddress < start || physicalAddress >= start + size) continue;
        uint64_t n = start + size - physicalAddress;      /* a read stops at the end of its chunk */
        if (n > bufferSize) n = bufferSize;
        if (fseek(d->memory, (long)(d->chunk_offset[i] + physicalAddress - start), SEEK_SET) != 0) return E_FAIL;
        size_t got = fread(buffer, 1, n, d->memory);
        if (bytesRead) *bytesRead = (uint32_t)got;
        return S_OK;
    }
    return E_INVALIDARG;
}
