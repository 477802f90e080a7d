namespace PaliGemma.CpuOnly.Quant;

/// <summary>Block formats for quantized weight matrices. Blocks run along K (the input features) within one row.</summary>
public enum QuantFormat
{
    /// <summary>Symmetric int8, 32 weights per block, one fp16 scale per block (fp32 where it does not fit, see <see cref="QuantizedMatrix.ScaleType"/>): w = q · scale, q in [-127, 127].</summary>
    Q8,
    /// <summary>4-bit NormalFloat, 64 weights per block, one fp16 absmax per block (fp32 where it does not fit): w = NF4[code] · absmax.</summary>
    Nf4,
}

public static class QuantFormats
{
    /// <summary>Weights per block along K.</summary>
    public static int BlockSize(this QuantFormat format) => format switch
    {
        QuantFormat.Q8 => 32,
        QuantFormat.Nf4 => 64,
        _ => throw new ArgumentOutOfRangeException(nameof(format), format, "unknown quantization format"),
    };

    /// <summary>Bytes one block's packed codes take (both formats: 32).</summary>
    public static int BlockBytes(this QuantFormat format) => format switch
    {
        QuantFormat.Q8 => 32,
        QuantFormat.Nf4 => 32,
        _ => throw new ArgumentOutOfRangeException(nameof(format), format, "unknown quantization format"),
    };

    /// <summary>Blocks per row of K weights; the last block is zero-padded.</summary>
    public static int BlocksPerRow(this QuantFormat format, int cols) => (cols + format.BlockSize() - 1) / format.BlockSize();

    /// <summary>The lower-case name used on the command line and in safetensors metadata ("q8", "nf4").</summary>
    public static string Name(this QuantFormat format) => format switch
    {
        QuantFormat.Q8 => "q8",
        QuantFormat.Nf4 => "nf4",
        _ => throw new ArgumentOutOfRangeException(nameof(format), format, "unknown quantization format"),
    };

    /// <summary>Parses "q8" or "nf4" (case-insensitive); null when the name is neither.</summary>
    public static QuantFormat? Parse(string? name) => name?.ToLowerInvariant() switch
    {
        "q8" => QuantFormat.Q8,
        "nf4" => QuantFormat.Nf4,
        _ => null,
    };
}
