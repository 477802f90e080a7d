using System.Runtime.InteropServices;
using PaliGemma.Bench.Onnx;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.Bench.Pairs;

/// <summary>
/// y = x W^T for x [M, K] and W [N, K]: ours is <see cref="MatMul.Multiply(ReadOnlySpan{float}, int, in WeightMatrix, ReadOnlySpan{float}, Span{float})"/>,
/// ORT's is one Gemm node with transB = 1 and W as a constant initializer (so ORT may pre-pack it, as it would for a model).
/// For BF16 weights ORT gets their exact fp32 upcast: ORT's CPU Gemm has no bf16 kernel, so fp32 is what it would run.
/// </summary>
internal sealed unsafe class MatMulPair : KernelPair
{
    private readonly NativeBuffer _x, _y;
    private readonly WeightMatrix _w;
    private readonly int _rows;

    public MatMulPair(string name, int rows, int k, int n, DType dtype) : base(name)
    {
        if (dtype is not (DType.F32 or DType.BF16))
            throw new ArgumentException($"weight dtype {dtype}: the comparison covers F32 and BF16", nameof(dtype));
        _rows = rows;
        long weights = (long)n * k;
        _x = Buffer((long)rows * k).FillUniform(1, 1f);
        _y = Buffer((long)rows * n);
        var ortY = Buffer((long)rows * n);
        float scale = 1f / MathF.Sqrt(k);
        var w32 = new NativeBuffer(weights).FillUniform(2, scale);
        if (dtype == DType.BF16)
        {
            // Truncate to bf16, and give ORT exactly those values widened back.
            void* bf16 = NativeMemory.AlignedAlloc((nuint)(weights * 2), 64);
            Own(new NativeOwner(bf16));
            uint* src = (uint*)w32.Pointer;
            ushort* dst = (ushort*)bf16;
            for (long i = 0; i < weights; i++)
            {
                dst[i] = (ushort)(src[i] >> 16);
                src[i] &= 0xFFFF0000u;
            }
            _w = new WeightMatrix(bf16, DType.BF16, n, k);
        }
        else
        {
            _w = new WeightMatrix(w32.Pointer, DType.F32, n, k);
        }

        var model = new OnnxModelBuilder();
        model.Input("x", rows, k);
        model.Initializer("w", w32.Pointer, weights, n, k);
        model.Node("Gemm", ["x", "w"], ["y"], OnnxAttribute.Of("transB", 1L));
        model.Output("y", rows, n);
        StartOrt(model, [("x", _x, [rows, k])], [("y", ortY, [rows, n])]);
        if (dtype == DType.BF16)
            w32.Dispose();          // ORT holds its own copy; ours reads the bf16 bytes
        else
            Own(w32);

        Flops = 2.0 * rows * k * n;
        OurBytes = weights * (dtype == DType.BF16 ? 2 : 4) + 4.0 * rows * (k + n);
        OrtBytes = weights * 4.0 + 4.0 * rows * (k + n);
        Note = dtype == DType.BF16 ? "ORT: fp32 upcast of the bf16 weights" : "";
        Check(_y, ortY, (long)rows * n);
    }

    public override void RunOurs() =>
        MatMul.Multiply(_x.Span, _rows, _w, ReadOnlySpan<float>.Empty, _y.Span);

    private sealed class NativeOwner(void* pointer) : IDisposable
    {
        public void Dispose() => NativeMemory.AlignedFree(pointer);
    }
}
