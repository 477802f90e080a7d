namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// An 8-bit RGB image stored row-major as height x width x 3 bytes (HWC), the layout PIL and numpy use for mode "RGB".
/// </summary>
public sealed class RgbImage
{
    /// <summary>Wraps <paramref name="pixels"/> (not copied) as a <paramref name="width"/> x <paramref name="height"/> RGB image.</summary>
    /// <exception cref="ArgumentOutOfRangeException">A dimension is not positive.</exception>
    /// <exception cref="ArgumentException">The pixel buffer does not hold exactly width * height * 3 bytes.</exception>
    public RgbImage(int width, int height, byte[] pixels)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(width);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(height);
        ArgumentNullException.ThrowIfNull(pixels);
        long expected = (long)width * height * 3;
        if (pixels.LongLength != expected)
        {
            throw new ArgumentException(
                $"A {width}x{height} RGB image needs {expected} bytes (width * height * 3), but the buffer holds {pixels.LongLength}.",
                nameof(pixels));
        }

        Width = width;
        Height = height;
        Pixels = pixels;
    }

    public int Width { get; }

    public int Height { get; }

    /// <summary>Row-major HWC bytes: pixel (x, y) channel c is at (y * Width + x) * 3 + c.</summary>
    public byte[] Pixels { get; }
}
