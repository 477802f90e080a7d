namespace PaliGemma.CpuOnly.Tensors;

/// <summary>
/// A read-only view of one tensor's bytes, usually inside a memory-mapped checkpoint. The memory stays
/// valid while the owning <see cref="SafetensorsFile"/> (or other owner) is alive.
/// </summary>
public readonly unsafe struct TensorData
{
    public TensorData(string name, DType dtype, long[] shape, byte* pointer, long byteLength, string source)
    {
        Name = name;
        DType = dtype;
        Shape = shape;
        Pointer = pointer;
        ByteLength = byteLength;
        Source = source;
    }

    /// <summary>Tensor name as written in the checkpoint.</summary>
    public string Name { get; }
    public DType DType { get; }
    public long[] Shape { get; }
    public byte* Pointer { get; }
    public long ByteLength { get; }
    /// <summary>File the tensor came from (for error messages).</summary>
    public string Source { get; }

    public long ElementCount
    {
        get
        {
            long n = 1;
            foreach (var d in Shape) n *= d;
            return n;
        }
    }

    public int Rank => Shape.Length;

    public string ShapeText => FormatShape(Shape);

    public static string FormatShape(ReadOnlySpan<long> shape) => "[" + string.Join(", ", shape.ToArray()) + "]";

    /// <summary>The bytes as a span; only for tensors under 2 GiB.</summary>
    public ReadOnlySpan<byte> Bytes => new(Pointer, checked((int)ByteLength));

    /// <summary>Copies the tensor into a new fp32 array, upconverting bf16/f16. Meant for small tensors (norms, biases).</summary>
    public float[] ToFloatArray()
    {
        var result = new float[checked((int)ElementCount)];
        switch (DType)
        {
            case DType.F32:
                new ReadOnlySpan<float>(Pointer, result.Length).CopyTo(result);
                break;
            case DType.BF16:
                var bf = new ReadOnlySpan<ushort>(Pointer, result.Length);
                for (int i = 0; i < result.Length; i++) result[i] = BitConverter.Int32BitsToSingle(bf[i] << 16);
                break;
            case DType.F16:
                var h = new ReadOnlySpan<Half>(Pointer, result.Length);
                for (int i = 0; i < result.Length; i++) result[i] = (float)h[i];
                break;
            default:
                throw new InvalidDataException($"tensor '{Name}' in '{Source}' has dtype {DType}; a floating-point tensor (F32, BF16, F16) is needed");
        }
        return result;
    }
}
