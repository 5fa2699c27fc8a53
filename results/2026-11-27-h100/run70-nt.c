#include <stdint.h>
#include <string.h>
#include <immintrin.h>
void copy_plain(void *d, const void *s, size_t n) { memcpy(d, s, n); }
__attribute__((target("avx2"))) void copy_nt(void *d, const void *s, size_t n) {
    char *dst = d; const char *src = s; size_t k = (size_t)((32 - ((uintptr_t)dst & 31)) & 31);
    if (k > n) k = n;
    memcpy(dst, src, k);
    for (; k + 128 <= n; k += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + k));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + k + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(src + k + 64));
        __m256i e = _mm256_loadu_si256((const __m256i *)(src + k + 96));
        _mm256_stream_si256((__m256i *)(dst + k), a);
        _mm256_stream_si256((__m256i *)(dst + k + 32), b);
        _mm256_stream_si256((__m256i *)(dst + k + 64), c);
        _mm256_stream_si256((__m256i *)(dst + k + 96), e);
    }
    _mm_sfence();
    memcpy(dst + k, src + k, n - k);
}
void copy_rep(void *d, const void *s, size_t n) {
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}
